"""Drafting that pays for itself: the decode engine's measured step costs and its draft choices.

A ``DraftBudget`` watches every decode step the engine runs — its shape (rows × width) and seconds;
a compiled engine's steps that compiled are left out — and every verify — the block length the
drafts came from and how many were accepted — and answers the engine's three questions before a
step:

* **block length** (``choose_length``): of ``K``, ``K/2``, ``K/4``, 2 and 1, the one with the most
  expected tokens per second at this batch size (a compute-bound step wastes least on short
  blocks); ``fixed:K`` keeps ``K``, and the full length runs every
  ``LEN_PROBE_EVERY`` steps so every depth's acceptance stays measured. The prefill's first
  drafts take the same length (``prefill_length``);
* **a second candidate block** (``choose_blocks``): when the drafts' confidences leave the accept
  length uncertain, a second block anchored at the next most likely length; worth it while the
  tokens it saves — the fraction of rows whose accept length it catches (measured) times the
  drafts a step then accepts — outweigh its measured extra cost;
* **the price of a block** (``price``): the accepted drafts per verify a row must earn for
  drafting to beat plain AR by ``MARGIN`` (10 %: at break-even the choice follows timing noise,
  and a wrong one costs more than the few per cent a right one gains, so it goes to AR); since a
  block widens the step for every row, the rows above it draft only while their averages sum to
  the price times the batch's running rows (the engine applies both on the device); rows below it
  decode as AR (the engine's ``ema``) and probe once per ``probe_interval`` steps — an interval
  that grows with the price, so probing never costs more than ``PROBE_SHARE`` of the AR steps
  between probes.

Step seconds are fitted as ``c0 + c1 · tokens`` by least squares over every shape seen
(``cost_model``): an overhead-bound machine (small batch, small model, an accelerator with spare
compute) gets ``c1 ≈ 0`` and drafts long; a compute-bound one (a large batch on a CPU) drafts short.
Until two drafting shapes have run, the prefill forwards (``record_prefill``) stand in, so the
engine's first decode steps already know what width costs: a wide batch on a CPU does not open
with a second block it cannot afford (one is tried only while it adds at most ``MEASURE_SHARE`` to
a step); after that prefills are no longer timed (``needs_prefill_timing``: timing one waits for
the device mid-step). A drafting shape or a prefill timed while AR steps cost ``ERA`` times what
they cost now no longer counts (a host since freed of other work: where drafting does not run, only
the rare probes would re-time it), so the prefills stand in again until drafting shapes run.
Expected accepted drafts come from the verify history: ``P(a ≥ j)`` among verifies whose block
reached depth ``j``; a drafting row commits ``1 + hit_rate · E[a]`` tokens a step, where
``hit_rate`` is the measured share of its steps whose accept length hit one of its blocks (the
others leave no drafts, so the next step verifies nothing). Once ``HISTORY`` observations are
counted, the counts are halved, so the estimates follow the recent past. All of this is host
arithmetic on a few dozen numbers, outside the step.

A budget measures one model on one device; it can outlive an engine (``Scheduler(budgets=…)``): a
new engine on the same model then starts from what earlier ones measured, as a long-lived server's
engine does, instead of from the optimistic prior.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 8  # a shape's cost is the least of its last WINDOW timings: a busy host only adds time
MIN_BLOCK_SAMPLES = 16  # rows seen with two blocks before the second block's worth is judged
DEFAULT_PRICE = 0.25  # a block's relative cost assumed before it is measured
LEN_PROBE_EVERY = 32  # steps between full-length blocks once a shorter one is chosen
MIN_VERIFIES = 8  # verifies observed before the block length adapts
PROBE_EVERY = 32  # the fewest steps between the probes of the rows decoding as AR ...
PROBE_SHARE = 0.05  # ... and at most this share of the AR steps' time spent probing
MEASURE_SHARE = 0.25  # a second block is tried only while it adds at most this share to a step
HISTORY = 4096  # verifies counted before the acceptance counts are halved (recent past weighs most)
MARGIN = 0.1  # a block must beat plain AR by this share of its cost: break-even choices go to AR
# a drafting shape (or a prefill) timed while AR steps cost this many times what they cost now was
# timed on a busier host: it no longer counts (``cost_model``)
ERA = 1.4


class DraftBudget:
    """Measured costs and acceptance of one engine; see the module docstring."""

    def __init__(self, k: int, *, fixed: bool, adaptive: bool) -> None:
        self.k, self.fixed, self.adaptive = k, fixed, adaptive
        self.step_cost: dict[tuple[int, int], float] = {}  # (rows, width) -> seconds
        self.prefill_cost: dict[int, float] = {}  # tokens of a prefill forward -> seconds
        self._timings: dict[object, deque[float]] = {}
        # what an AR shape cost when a drafting shape or a prefill was last timed: (rows, seconds)
        self._ar_then: dict[object, tuple[int, float]] = {}
        self._ar_rows: int | None = None  # the rows of the AR step recorded last
        self.verifies_by_len = [0] * (k + 1)  # verifies of drafts from blocks of length L
        self.accepted_by_count = [0] * (k + 2)  # verifies that accepted a drafts
        self.length = k  # the block length chosen last
        self.block_rows = 0  # row-steps with at least one candidate block ...
        self.block_hits = 0  # ... whose accept length hit one of them (the next step verifies)
        self.two_block_rows = 0  # rows that had two candidate blocks in a step ...
        self.second_hits = 0  # ... and whose accept length the second one caught
        self._fit: tuple[float, float] | None = None
        self._steps = 0  # block-length choices made (every LEN_PROBE_EVERY-th runs the full K)
        self._decode_steps = 0  # decode steps recorded ...
        self._last_probe = 0  # ... and the one on which the AR rows last probed

    # ------------------------------------------------------------------ observations

    def record(self, rows: int, width: int, seconds: float) -> None:
        """A decode step of ``rows`` × ``width`` tokens took ``seconds`` (width 1: plain AR)."""
        self.step_cost[(rows, width)] = self._least_recent((rows, width), seconds)
        if width == 1:
            self._ar_rows = rows
        else:
            self._mark((rows, width), rows)
        self._fit = None
        self._decode_steps += 1

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill forward of ``tokens`` tokens (slots included) took ``seconds``."""
        self.prefill_cost[tokens] = self._least_recent(("prefill", tokens), seconds)
        if self._ar_rows is not None:
            self._mark(("prefill", tokens), self._ar_rows)
        self._fit = None

    def needs_prefill_timing(self) -> bool:
        """Whether ``cost_model`` still reads prefill forwards: until two drafting step shapes
        (token counts) have run. After that a prefill is not timed, so the engine spares the
        device synchronisation its timing takes (one a step in a loaded server)."""
        return len({r * w for (r, w) in self.step_cost if w > 1 and self._current((r, w))}) < 2

    def _least_recent(self, key: object, seconds: float) -> float:
        """The least of a shape's last ``WINDOW`` timings: robust to a host busy with other work
        (which only ever adds time), still following a cost that grows with the context."""
        timings = self._timings.setdefault(key, deque(maxlen=WINDOW))
        timings.append(seconds)
        return min(timings)

    def _mark(self, key: object, rows: int) -> None:
        """Remember, as ``key`` is timed (its era), what the AR step measured nearest ``rows``
        rows costs — the same AR shape is compared later, whatever else gets measured since."""
        ar = [r for (r, w) in self.step_cost if w == 1]
        if ar:
            near = min(ar, key=lambda r: (abs(r - rows), r))
            self._ar_then[key] = (near, self.step_cost[(near, 1)])

    def _current(self, key: object) -> bool:
        """Whether ``key``'s timing is of this host's present: not taken while its AR shape cost
        ``ERA`` times what it costs now (a host since freed of other work)."""
        then = self._ar_then.get(key)
        now = None if then is None else self.step_cost.get((then[0], 1))
        return now is None or now * ERA >= then[1]

    def observe(self, drafted_len: int, accepted: int) -> None:
        """A verify of drafts from a block of ``drafted_len`` slots accepted ``accepted``."""
        self.verifies_by_len[min(drafted_len, self.k)] += 1
        self.accepted_by_count[accepted] += 1
        if sum(self.verifies_by_len) >= HISTORY:
            self.verifies_by_len = [n // 2 for n in self.verifies_by_len]
            self.accepted_by_count = [n // 2 for n in self.accepted_by_count]

    def observe_blocks(self, had: int, hit: int) -> None:
        """A row had ``had`` candidate blocks and its accept length hit block ``hit`` (-1: none)."""
        if had >= 1:
            self.block_rows += 1
            self.block_hits += hit >= 0
            if self.block_rows >= HISTORY:
                self.block_rows //= 2
                self.block_hits //= 2
                self.two_block_rows //= 2
                self.second_hits //= 2
        if had >= 2:
            self.two_block_rows += 1
            self.second_hits += hit >= 1

    # ------------------------------------------------------------------ estimates

    def cost_model(self) -> tuple[float, float] | None:
        """``(c0, c1)``: a drafting step's seconds ≈ c0 + c1 · tokens, least squares over the
        drafting shapes seen, the prefill forwards added until two token counts ran (None until
        then). Plain AR steps (width 1) are kept apart: a drafting step also pays for reading its
        slots, which width alone does not tell.

        A shape timed while AR steps cost ``ERA`` times what they cost now is left out: where
        drafting does not pay its shapes are timed again only by the rare probes, while every AR
        step re-times AR, so drafting timed on a busy host would keep it priced out long after
        the host is quiet, its rows never drafting to show otherwise. With fewer than two current
        drafting shapes the prefill forwards stand in again (and are timed again) until they run."""
        if self._fit is None:
            pts = [(r * w, t) for (r, w), t in self.step_cost.items()
                   if w > 1 and self._current((r, w))]  # fmt: skip
            if len({x for x, _ in pts}) < 2:
                pts += [(n, t) for n, t in self.prefill_cost.items()
                        if self._current(("prefill", n))]  # fmt: skip
            if len({x for x, _ in pts}) < 2:
                return None
            n = len(pts)
            mx, my = sum(x for x, _ in pts) / n, sum(t for _, t in pts) / n
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            c1 = max(0.0, sum((x - mx) * (t - my) for x, t in pts) / sxx)
            self._fit = (max(my - c1 * mx, 1e-9), c1)
        return self._fit

    def seconds(self, rows: int, width: int) -> float | None:
        """A step's expected seconds. Plain AR (width 1): measured at this row count, else at the
        nearest one measured (plus the model's cost of the rows between) — the drafting model's
        ``c0`` also holds the slots' reading, so it would make AR look dear and drafting cheap.
        Drafting steps: the cost model's."""
        fit = self.cost_model()
        if width == 1:
            ar = [r for (r, w) in self.step_cost if w == 1]
            if ar:
                near = min(ar, key=lambda r: (abs(r - rows), r))
                extra = 0.0 if fit is None else fit[1] * (rows - near)
                return max(self.step_cost[(near, 1)] + extra, 1e-9)
        return None if fit is None else fit[0] + fit[1] * rows * width

    def expected_accept(self, length: int) -> float:
        """Expected accepted drafts per verify when blocks hold ``length`` slots."""
        total = 0.0
        reached = sum(self.accepted_by_count)  # verifies that accepted >= j drafts, j = 0 ...
        tried = sum(self.verifies_by_len)  # verifies whose block reached depth j
        for j in range(1, length + 1):
            reached -= self.accepted_by_count[j - 1]
            tried -= self.verifies_by_len[j - 1]
            if tried <= 0:
                break
            total += reached / tried
        return total

    def prior_accept(self) -> float:
        """What a new request's drafts are expected to earn per verify: the history's average at
        the block length now chosen once there is a history, ``K`` (optimistic: draft and see)
        before."""
        if not self.has_history():
            return float(self.k)
        return self.expected_accept(self.length)

    def hit_rate(self) -> float:
        """The share of drafting row-steps whose accept length hit one of their blocks — only
        those steps leave drafts for the next one to verify (1 until measured)."""
        if self.block_rows < MIN_BLOCK_SAMPLES:
            return 1.0
        return max(self.block_hits / self.block_rows, 1e-3)

    def has_history(self) -> bool:
        """Whether enough verifies were seen for the history to replace the optimistic prior."""
        return sum(self.verifies_by_len) >= MIN_VERIFIES

    def drafting_pays(self, rows: int) -> bool:
        """Whether a new request should start by drafting: before a history, yes (draft and
        see); then, whether drafts of the length a step at ``rows`` would choose earn its price."""
        if not self.adaptive or not self.has_history():
            return True
        length = self._length(rows)
        return self.expected_accept(length) >= self.price(rows, length)

    # ------------------------------------------------------------------ decisions

    def price(self, rows: int, length: int | None = None) -> float:
        """Accepted drafts per verify that blocks of ``length`` (default: the length chosen last)
        must earn: their relative extra cost with the ``MARGIN`` over AR, over the share of steps
        that find drafts to verify (``hit_rate``)."""
        ar = self.seconds(rows, 1)
        drafted = self.seconds(rows, 2 * (self.length if length is None else length) + 1)
        if ar is None or drafted is None:
            return DEFAULT_PRICE  # until the cost of steps has been measured
        return max(0.0, (1.0 + MARGIN) * drafted / ar - 1.0) / self.hit_rate()

    def probe_interval(self, rows: int) -> int:
        """Steps between the probes of rows decoding as AR: a probe costs about ``2 · price`` AR
        steps (the step that drafts and the one that verifies), so it comes once per
        ``2 · price / PROBE_SHARE`` steps, never more often than once per ``PROBE_EVERY``."""
        return max(PROBE_EVERY, math.ceil(2 * self.price(rows) / PROBE_SHARE))

    def choose_length(self, rows: int) -> int:
        """This step's block length (see the module docstring). The chosen length is remembered
        as ``length`` (what prices are taken at); a full-length probe step is not."""
        self._steps += 1
        self.length = self._length(rows)
        return self.k if self._steps % LEN_PROBE_EVERY == 0 else self.length

    def probe_due(self, rows: int) -> bool:
        """Whether the rows decoding as AR probe on this step: once per ``probe_interval`` decode
        steps, counted over every engine that shares this budget (a short call whose history
        says drafting does not pay still probes in turn)."""
        due = self._decode_steps - self._last_probe >= self.probe_interval(rows)
        if due:
            self._last_probe = self._decode_steps
        return due

    def prefill_length(self, rows: int) -> int:
        """The length of a prefill's first drafts: the one a decode step of ``rows`` rows would
        choose, since that step verifies them and drafts on."""
        return self._length(rows)

    def _length(self, rows: int) -> int:
        k = self.k
        if self.fixed or not self.adaptive or k <= 1:
            return k
        if sum(self.verifies_by_len) < MIN_VERIFIES or self.cost_model() is None:
            return k

        hit = self.hit_rate()

        def rate(n: int) -> float:
            # committed tokens per second of a row that keeps drafting n-slot blocks: each step
            # verifies up to n pending drafts and drafts n more (width 2n + 1)
            return (1 + hit * self.expected_accept(n)) / self.seconds(rows, 2 * n + 1)

        return max(
            sorted({k, max(1, k // 2), max(1, k // 4), min(k, 2), 1}, reverse=True), key=rate
        )

    def choose_blocks(self, rows: int, big_m: int, wanted: int, length: int) -> int:
        """Blocks for this step: what the drafts' coverage asks for; a second one while its
        measured catch rate times the drafts a step accepts outweighs its extra cost."""
        if wanted <= 1:
            return wanted
        one = self.seconds(rows, big_m + 1 + length)
        two = self.seconds(rows, big_m + 1 + 2 * length)
        if self.two_block_rows < MIN_BLOCK_SAMPLES:  # measure what a second block catches first,
            cheap = one is None or two is None or two / one - 1.0 <= MEASURE_SHARE
            return 2 if cheap else 1  # ... where trying it costs little
        if one is None or two is None:
            return 2
        gained = self.second_hits / self.two_block_rows * self.expected_accept(length)
        return 2 if two / one - 1.0 <= gained / (1.0 + self.expected_accept(length)) else 1
