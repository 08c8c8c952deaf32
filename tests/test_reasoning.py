"""The `<think>`/`<answer>` splitter: whole texts, and every way a stream can cut them (tags split included)."""
from __future__ import annotations

import pytest

from function.api.reasoning import ReasoningParser, split_reasoning

CASES = [
    # (model output, reasoning, content)
    ("<think>tap the icon</think><answer>do(action=\"Tap\", element=[1,2])</answer>",
     "tap the icon", "do(action=\"Tap\", element=[1,2])"),
    ("<think>\nline one\nline two\n</think>\n<answer>finish(message=\"done\")</answer>",
     "line one\nline two", "finish(message=\"done\")"),
    ("\n  <think>a</think>b", "a", "b"),                                  # leading whitespace before the block
    ("<think>a</think><answer>x", "a", "x"),                              # </answer> is an EOS: often absent
    ("<think></think><answer>x</answer>", "", "x"),                       # an empty think block
    ("<think>still thinking when max_tokens hit", "still thinking when max_tokens hit", ""),
    ("<think>a < b and c <th d</think>x", "a < b and c <th d", "x"),      # '<' inside reasoning is text
    ("<think>a</think><answer>1 <ans 2</answer>", "a", "1 <ans 2"),
    ("<think>a</think>x</answer>tail", "a", "xtail"),
]
NO_THINK = [
    ("<answer>do(action=\"Back\")</answer>", "do(action=\"Back\")"),      # enable_thinking=false
    ("plain text", "plain text"),
    ("text then <think>late</think>", "text then late"),   # a think block counts only at the start; no tags left
    ("<thinking>not a tag</thinking>", "<thinking>not a tag</thinking>"),
    ("<thi", "<thi"),                                                     # a partial tag at the very end is text
    ("", ""),
    ("   ", ""),
]


@pytest.mark.parametrize("text,reasoning,content", CASES)
def test_split(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize("text,content", NO_THINK)
def test_no_think_block(text, content):
    assert split_reasoning(text) == (None, content)


def stream(pieces: list[str]) -> tuple[str, str, bool]:
    p = ReasoningParser()
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        d = p.feed(piece, final=i == len(pieces) - 1)
        reasoning += d.reasoning
        content += d.content
    return reasoning, content, p.saw_think


@pytest.mark.parametrize("text", [c[0] for c in CASES] + [c[0] for c in NO_THINK if c[0]])
def test_streaming_equals_whole_for_every_cut(text):
    whole_reasoning, whole_content = split_reasoning(text)
    want = (whole_reasoning or "", whole_content, whole_reasoning is not None)
    assert stream(list(text)) == want                                   # one character at a time
    for i in range(len(text) + 1):                                      # every two-piece cut
        assert stream([text[:i], text[i:]]) == want, i
    for i in range(len(text) + 1):                                      # with empty increments around the cut
        assert stream([text[:i], "", text[i:], ""]) == want, i


def test_held_back_text_is_released_as_soon_as_it_cannot_be_a_tag():
    p = ReasoningParser()
    assert (p.feed("<think>abc</th").reasoning, p.feed("x").reasoning) == ("abc", "</thx")
    p = ReasoningParser()
    p.feed("<think>r</think>")
    assert (p.feed("ans <").content, p.feed("b>").content) == ("ans", " <b>")


def test_trailing_whitespace_waits_for_more_text():
    p = ReasoningParser()
    assert p.feed("<think>one ").reasoning == "one"
    assert p.feed("two").reasoning == " two"
    assert p.feed("\n</think>", final=True).reasoning == ""
