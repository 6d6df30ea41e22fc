"""Text in and out of the server: prompts to token ids, token ids to streamed text with ``stop``.

* ``completion_ids`` encodes a completion prompt exactly as ``fluid generate --prompt`` does
  (``fluid_npu.sampling.prompts.encode_prompt``), so a served completion equals the offline one;
  token-id prompts are used as given (checked against the vocabulary).
* ``chat_ids`` renders the messages with the tokenizer's own chat template and the assistant turn
  opened (``add_generation_prompt``), as ``fluid generate --chat`` does for one user message.
* ``Detokenizer`` turns committed token ids into text deltas: the output's text with special
  tokens skipped (as ``fluid generate`` writes it), decoded a chunk at a time; a trailing
  incomplete UTF-8 character is held back, and with ``stop`` strings the text is cut before the
  first one (OpenAI's rule: the stop string is not returned) and the tail that could still become
  a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Any

from fluid_npu.errors import FluidError
from fluid_npu.serve.protocol import APIError


def completion_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt; a bad one is an ``APIError`` naming ``prompt``."""
    from fluid_npu.sampling.prompts import encode_prompt

    row = {"input_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    try:
        return encode_prompt(tokenizer, row, where="prompt").ids
    except FluidError as exc:
        raise APIError(str(exc).removeprefix("prompt: "), param="prompt") from None


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    from fluid_npu.sampling.prompts import chat_template_ids

    try:
        return chat_template_ids(tokenizer, messages)
    except Exception as exc:  # the template's own error (e.g. a role it does not allow)
        raise APIError(
            f"the chat template rejected the messages: {exc}", param="messages"
        ) from None


class Detokenizer:
    """Incremental text of one request's output, with ``stop`` strings applied.

    Each call decodes only the newest tokens, with the previous chunk before them as context
    (``prefix``…``read``: a tokenizer may spell a token differently at the start of a text, e.g.
    without its leading space), so a long output costs linear, not quadratic, time on the event
    loop; stop strings are searched only in the text that could newly contain one.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the decoded output so far (cut at a stop string once one is found)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found: the output ends here
        self.prefix = self.read = 0  # tokens[prefix:read]: context; tokens[:read] are settled
        self.settled = 0  # characters of ``text`` that tokens[:read] spell

    def add(self, tokens: list[int]) -> str:
        """Feed committed tokens; returns the text that is now safe to send (maybe empty).

        With stop strings the tokens are taken one at a time, so ``tokens_used`` counts exactly
        the tokens up to the one that completed the stop string.
        """
        if self.stopped:
            return ""
        if not self.stop:
            self.tokens.extend(tokens)
            self._advance(final=False)
            return self._release(final=False)
        for tok in tokens:
            self.tokens.append(tok)
            start = max(0, self.settled - self.hold)  # a stop may begin in the held-back tail
            self._advance(final=False)
            cut = min(
                (i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1
            )
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._release(final=True)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of the output."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(final=True)

    @property
    def tokens_used(self) -> int:
        return len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Bring ``text`` up to every token fed. The newest tokens' text is decoded with the
        previous chunk before them; while it ends in an incomplete multi-byte character it stays
        provisional (those tokens are decoded again with the next ones) until the output ends."""
        if self.read == len(self.tokens):
            return
        before = self._decode(self.tokens[self.prefix : self.read])
        now = self._decode(self.tokens[self.prefix :])
        if not now.startswith(before):  # the context changed its own spelling (rare)
            self.text = self._decode(self.tokens)
        else:
            self.text = self.text[: self.settled] + now[len(before) :]
            if now.endswith("\ufffd") and not final:
                return  # provisional: the settled text ends where it did
        self.settled = len(self.text)
        self.prefix, self.read = self.read, len(self.tokens)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for it
                end -= 1
            end = max(self.sent, end - self.hold) if self.stop else end
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out
