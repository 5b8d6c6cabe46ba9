"""Reasoning parsers: split a thinking model's output into `reasoning_content` and `content`
(`--reasoning-parser NAME`), whole or streamed.

* deepseek_r1  `<think>` usually sits in the prompt, so everything up to `</think>` is reasoning (all of it while
               `</think>` has not come); a `<think>` the model writes itself is dropped.
* qwen3        reasoning only inside `<think>...</think>` at the start of the output; an output without
               `<think>` (thinking switched off) is all content.
"""
from __future__ import annotations

from typing import Optional


class ReasoningParser:
    name = ""
    start, end = "<think>", "</think>"
    implicit_start = True  # the reasoning begins without a start tag

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def extract_reasoning(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """(reasoning, content); either is None when empty."""
        body = text.lstrip()
        if body.startswith(self.start):
            body = body[len(self.start):]
        elif not self.implicit_start:
            return None, text or None
        reasoning, sep, content = body.partition(self.end)
        if not sep:
            return reasoning or None, None
        return reasoning or None, content or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    implicit_start = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser, "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {', '.join(REASONING_PARSERS)}") \
            from None


class ReasoningStreamer:
    """Feed text deltas, get (reasoning delta, content delta); tags are held back until they are complete."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of `text` handled
        self.state = "start"  # start -> reasoning -> content

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        p, reasoning, content = self.parser, [], []
        while True:
            rest = self.text[self.sent:]
            if self.state == "start":
                stripped = rest.lstrip()
                if not stripped or (p.start.startswith(stripped) and stripped != p.start):
                    return "", ""  # may still become <think>
                if stripped.startswith(p.start):
                    self.sent += len(rest) - len(stripped) + len(p.start)
                    self.state = "reasoning"
                else:
                    self.state = "reasoning" if p.implicit_start else "content"
                continue
            if self.state == "reasoning":
                i = rest.find(p.end)
                if i >= 0:
                    reasoning.append(rest[:i])
                    self.sent += i + len(p.end)
                    self.state = "content"
                    continue
                keep = _partial_suffix(rest, p.end)
                reasoning.append(rest[:len(rest) - keep])
                self.sent += len(rest) - keep
                break
            content.append(rest)
            self.sent += len(rest)
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Whatever is still held (a tag that never completed) goes out as it is."""
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if self.state == "content" or (self.state == "start" and not self.parser.implicit_start):
            return "", rest
        return rest, ""

    @property
    def in_content(self) -> bool:
        return self.state == "content"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
