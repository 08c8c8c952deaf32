"""Splitting AutoGLM's `<think>…</think><answer>…</answer>` output into reasoning and answer, whole or streamed.

Used only when a request asks for `return_reasoning`; by default clients get the model's text untouched, as vLLM
serves AutoGLM and as phone-agent clients parse it. The streaming parser is the only implementation: the full-text
split feeds it the whole text, so both modes give the same result by construction.

Rules: a think block counts only at the start of the output (after whitespace); the content carries no tags at all
(`<answer>`, `</answer>` and any stray `<think>`/`</think>` after the think block are dropped); reasoning and
content are trimmed of surrounding whitespace. Tags may arrive split across
increments: a suffix that could still become a tag is held back until the next increment decides it.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_TAGS = ("<answer>", "</answer>", THINK_OPEN, THINK_CLOSE)   # dropped from the content


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


def _partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


class _Trimmed:
    """One output channel without leading/trailing whitespace: trailing whitespace waits for more text."""

    def __init__(self) -> None:
        self.started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self._pending += text
            return ""
        out, self._pending = self._pending + body, text[len(body):]
        return out


class ReasoningParser:
    """Incremental `<think>`/`<answer>` splitter: `feed()` each increment, the last one with `final=True`."""

    def __init__(self) -> None:
        self._state = "start"      # start -> think -> answer, or start -> answer when there is no think block
        self._buf = ""
        self._reasoning = _Trimmed()
        self._content = _Trimmed()
        self.saw_think = False     # the output opened a think block

    def feed(self, text: str, final: bool = False) -> ReasoningDelta:
        """The reasoning and content that `text` completes; `final` flushes what was held back."""
        out = self._advance(text)
        if final:
            rest, self._buf = self._buf, ""
            if self._state == "think":
                out.reasoning += self._reasoning.push(rest)
            else:
                out.content += self._content.push(rest)
        return out

    def _advance(self, text: str) -> ReasoningDelta:
        self._buf += text
        out = ReasoningDelta()
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf, self._state, self.saw_think = head[len(THINK_OPEN):], "think", True
                elif THINK_OPEN.startswith(head):
                    return out                      # only whitespace or the start of "<think>" so far
                else:
                    self._state = "answer"
            elif self._state == "think":
                end = self._buf.find(THINK_CLOSE)
                if end < 0:
                    keep = _partial_tag_len(self._buf, (THINK_CLOSE,))
                    out.reasoning += self._reasoning.push(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                out.reasoning += self._reasoning.push(self._buf[:end])
                self._buf, self._state = self._buf[end + len(THINK_CLOSE):], "answer"
            else:
                hits = [(i, t) for t in ANSWER_TAGS if (i := self._buf.find(t)) >= 0]
                if hits:
                    i, tag = min(hits)
                    out.content += self._content.push(self._buf[:i])
                    self._buf = self._buf[i + len(tag):]
                    continue
                keep = _partial_tag_len(self._buf, ANSWER_TAGS)
                out.content += self._content.push(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None when the output has no think block, answer content) of a whole output."""
    parser = ReasoningParser()
    out = parser.feed(text, final=True)
    return (out.reasoning if parser.saw_think else None), out.content
