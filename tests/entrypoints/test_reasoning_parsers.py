"""Reasoning parsers on hand-written outputs: whole, and streamed in every chunking."""
from __future__ import annotations

import pytest

from pageport.entrypoints.openai.reasoning_parsers import ReasoningStreamer, get_reasoning_parser

CASES = [
    # (parser, output, reasoning, content)
    ("deepseek_r1", "Let me think. 2+2=4.</think>\n\nThe answer is 4.", "Let me think. 2+2=4.", "\n\nThe answer is 4."),
    ("deepseek_r1", "<think>\nHmm, <b>bold</b> idea.\n</think>Done", "\nHmm, <b>bold</b> idea.\n", "Done"),
    ("deepseek_r1", "Still thinking when the tokens ran out", "Still thinking when the tokens ran out", None),
    ("deepseek_r1", "</think>Straight to the answer", None, "Straight to the answer"),
    ("deepseek_r1", "a </thin b</think>c", "a </thin b", "c"),
    ("qwen3", "<think>\nThe user greets me.\n</think>\n\nHello!", "\nThe user greets me.\n", "\n\nHello!"),
    ("qwen3", "Hello! No thinking here.", None, "Hello! No thinking here."),
    ("qwen3", "<think>cut off", "cut off", None),
    ("qwen3", "<thin is not a tag", None, "<thin is not a tag"),
    ("qwen3", "<think></think>Empty thought", None, "Empty thought"),
]


@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_whole_output(name, text, reasoning, content):
    assert get_reasoning_parser(name)().extract_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_streamed_output(name, text, reasoning, content, chunk):
    streamer = ReasoningStreamer(get_reasoning_parser(name)())
    r, c = [], []
    for i in range(0, len(text), chunk):
        dr, dc = streamer.feed(text[i:i + chunk])
        r.append(dr)
        c.append(dc)
        assert "</think>" not in dr + dc and "<think>" not in dr
    dr, dc = streamer.finish()
    r.append(dr)
    c.append(dc)
    assert ("".join(r) or None, "".join(c) or None) == (reasoning, content)


def test_reasoning_streams_before_the_end_tag():
    streamer = ReasoningStreamer(get_reasoning_parser("deepseek_r1")())
    assert streamer.feed("First step") == ("First step", "")
    assert streamer.feed(", then</th") == (", then", "")  # the possible tag is held
    assert streamer.feed("ink>Answer") == ("", "Answer")
    assert streamer.in_content


def test_unknown_parser():
    with pytest.raises(ValueError, match="choose one of: deepseek_r1, qwen3"):
        get_reasoning_parser("o1")
