"""A decode step's one host read turned into each request's ``Event`` (``step.py`` packs the read):
its committed tokens (cut by a grammar, a stop string or a row left no token), log-probabilities,
ranks and alternatives, what its drafts earned (the drafting budget), and its end (the slot freed).
"""

from __future__ import annotations

from fluid_npu.sampling.requests import Event


class EventsMixin:
    """``Scheduler``'s reading of a step (it owns the slots, the budget and the histograms)."""

    def _events(
        self, packed: list[list[float]], hi: int, big_m: int, k: int, n_top: int = 0
    ) -> list[Event]:
        events = []
        w = big_m + 1
        for i in range(hi):
            s = self.slots[i]
            if s is None or not s.running:
                continue
            row = packed[i]
            take, done, a, m = (int(x) for x in row[:4])  # done 2: the row's numbers broke
            toks = [int(t) for t in row[4 : 4 + take]]
            lps = tops = ranks = None
            if s.params.logprobs:
                at = 4 + w + 4
                lps = row[at : at + take]
                ranks = [int(x) for x in row[at + w : at + w + take]]
                at += w  # (the ranks' columns)
                if s.params.top_logprobs:
                    ids = row[at + w : at + w + w * n_top]
                    vals = row[at + w + w * n_top : at + w + 2 * w * n_top]
                    n = s.params.top_logprobs
                    tops = [
                        [(int(ids[t * n_top + r]), vals[t * n_top + r]) for r in range(n)]
                        for t in range(take)
                    ]
            if s.armed:  # (constrained.py) its grammar holds the tokens after its marker
                self._arm(i, s, toks)
            elif s.matcher is not None:  # (grammar.follow) a refused token ends the row there
                toks, lps, tops, done = self._follow(s, toks, lps, tops, done)
            if done == 3:  # nothing left to generate: its accepted drafts, then "stop"
                s.stopped, done = True, 1
            if s.req.stop and toks:
                cut = self._stop_cut(s, toks)
                if cut is not None:
                    toks, done = toks[:cut], 1
                    lps = None if lps is None else lps[:cut]
                    tops = None if tops is None else tops[:cut]
            hit = int(row[4 + w + 3])
            free = s.matcher is None or s.armed
            if s.params.greedy and (free or s.model_drafts):  # what greedy drafts earn (a
                # sampling row's rejection rule differs; a constrained row's forced ones are not
                # the model's: constrained.py)
                if m and s.drafted:  # a verify of drafts from a block of s.drafted slots
                    self.budget.observe(s.drafted, a)
                if free:
                    self.budget.observe_blocks(int(row[4 + w + 2]), hit)
            s.drafted = k if hit >= 0 else 0  # the next drafts: this step's block of k slots
            s.forwards += 1
            s.new.extend(toks)
            self.accept_hist[a] += 1
            self.k_hist[m] += 1
            reason = None
            if done:
                stopped = s.stopped or (toks and toks[-1] in self._eos_of(i))
                reason = "error" if done == 2 else "stop" if stopped else "length"
                self._ids.discard(s.req.request_id)
                self._free(i, reason)
            # the accepted drafts that went into the output (a limit, EOS or stop string can end
            # the step's tokens inside the accepted run)
            kept = min(a, len(toks))
            event = Event(
                s.req.request_id, toks, bool(done), reason, len(s.new), s.forwards, kept, lps, tops,
                cached=s.cached, ranks=None if ranks is None else ranks[: len(toks)], drafted=m,
                drafts_accepted=a, **s.times(),
            )  # fmt: skip
            if s.prompt_lps is not None:  # the prompt's log-probabilities, in the first event
                event.prompt_logprobs, s.prompt_lps = s.prompt_lps, None
            events.append(event)
        return events

    def _eos_of(self, i: int) -> list[int]:
        s = self.slots[i]
        return list(s.req.eos_ids) if s.req.eos_ids is not None else self.eos_ids
