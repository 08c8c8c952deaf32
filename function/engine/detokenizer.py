"""Incremental detokenization (tokenizers' own DecodeStream, which handles UTF-8 split across tokens) and stop
strings, per request, on the request's own coroutine so the engine thread never decodes text.

As vLLM: special tokens are skipped by default (`skip_special_tokens`); the text of what ended the output - the
end token or `stop_token_ids` id that was sampled last, or the stop string - is left out unless
`include_stop_str_in_output`; stop strings count only after `min_tokens` tokens. Text that could be the start of a
stop string is held back until it is known not to be one, so a stop string never leaks into a stream.
"""
from __future__ import annotations

from collections.abc import Collection

from tokenizers.decoders import DecodeStream


class OutputText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 stop_token_ids: Collection[int] = (), include_stop: bool = False, min_tokens: int = 0):
        self._rust = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        self.n_tokens = 0
        self.text = ""          # all text so far (up to a stop string, once one is found)
        self.sent = 0           # characters of `text` already returned
        self.stop_hit: str | None = None

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Feed new tokens; return the text that may be sent now. `final`: these are the output's last tokens
        (a last token in `stop_token_ids` ended it, and its text is dropped unless `include_stop`). After a stop
        string, `stop_hit` is set and the returned text ends right before it (or after it, with `include_stop`)."""
        if final and token_ids and token_ids[-1] in self.stop_token_ids and not self.include_stop:
            token_ids = token_ids[:-1]
        for t in token_ids:
            self.n_tokens += 1
            piece = self._stream.step(self._rust, t)
            if piece:
                self.text += piece
        if self.stop and self.n_tokens > self.min_tokens:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text, self.stop_hit = self.text[:i + (len(s) if self.include_stop else 0)], s
                return self._take(len(self.text))
            return self._take(len(self.text) - self._held())
        return self._take(len(self.text))

    def flush(self) -> str:
        """The held-back text, at the end of the output."""
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
