"""Per-request token rules that are not grammars: `allowed_token_ids` (a fixed row) and `bad_words` (the tokens
that would complete a banned word after what the request has generated so far).

`allowed_token_ids` rows use the grammars' bitmask layout, so one `apply_bitmask` (xgrammar's kernel on the
logits' device) applies them to the rows that have them; bad words are a handful of -inf entries per row. Rows
with neither are never touched (`apply_token_rules` returns at once when no row has a rule).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pageport.core.structured_output import apply_bitmask, bitmask_width

_NEG_INF = float("-inf")


def allowed_tokens_row(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    """int32 [ceil(vocab/32)]: only `token_ids` allowed. Ids past the vocabulary are a ValueError."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"allowed_token_ids must be non-empty token ids in [0, {vocab_size})")
    bits = torch.zeros(bitmask_width(vocab_size) * 32, dtype=torch.int64)
    bits[ids] = 1
    words = (bits.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # as int32 bit patterns


def forbid(row: torch.Tensor, token_ids: Sequence[int]) -> None:
    """Clear the bits of `token_ids` in a bitmask row, in place."""
    for t in token_ids:
        word, bit = divmod(int(t), 32)
        value = int(row[word]) & ~(1 << bit) & 0xFFFFFFFF
        row[word] = value - 2 ** 32 if value >= 2 ** 31 else value


def bad_words_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word stripped on the left, alone, and after a space when that
    gives a different first token and as many tokens (the word in the middle of a text)."""
    out: list[list[int]] = []
    for w in words:
        plain = tokenizer.encode(w.lstrip(), add_special_tokens=False)
        if plain:
            out.append(list(plain))
        spaced = tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(list(spaced))
    return out


class BadWords:
    """Banned token sequences: a one-token word is never generated, a longer one's last token is banned
    right after its other tokens (matched against the request's output only, as vLLM)."""

    def __init__(self, tokenizer, words: Sequence[str]):
        self.sequences = sorted({tuple(s) for s in bad_words_token_ids(tokenizer, words)})

    @classmethod
    def from_token_ids(cls, sequences: Sequence[Sequence[int]]) -> "BadWords":
        self = cls.__new__(cls)
        self.sequences = sorted({tuple(s) for s in sequences if len(s)})
        return self

    @property
    def always(self) -> list[int]:
        return sorted({s[0] for s in self.sequences if len(s) == 1})

    @property
    def needs_history(self) -> bool:
        """Some word has several tokens: the rule reads the last generated tokens every step."""
        return any(len(s) > 1 for s in self.sequences)

    def banned(self, output_ids: Sequence[int]) -> list[int]:
        """The tokens that may not come next after `output_ids`."""
        out = set()
        n = len(output_ids)
        for seq in self.sequences:
            k = len(seq) - 1
            if k == 0 or (k <= n and tuple(output_ids[n - k:]) == seq[:-1]):
                out.add(seq[-1])
        return sorted(out)


# the engine's side ----------------------------------------------------------------------------------------------
def _rules(params, vocab_size: int):
    """(allowed bitmask row or None, BadWords or None), made once per request and kept on its params (the
    core's own copy)."""
    cached = params.__dict__.get("_token_rules")
    if cached is None or cached[0] != vocab_size:
        allowed = allowed_tokens_row(params.allowed_token_ids, vocab_size) if params.allowed_token_ids else None
        ids = getattr(params, "_bad_words_token_ids", None)
        bad = BadWords.from_token_ids(ids) if ids else None
        cached = (vocab_size, allowed, bad)
        params.__dict__["_token_rules"] = cached
    return cached[1], cached[2]


def has_token_rules(params) -> bool:
    return bool(params.allowed_token_ids) or bool(getattr(params, "_bad_words_token_ids", None))


def needs_history(params) -> bool:
    """The request's rules read its last generated tokens each step (a bad word of several tokens)."""
    return any(len(s) > 1 for s in (getattr(params, "_bad_words_token_ids", None) or ()))


def apply_token_rules(logits: torch.Tensor, requests: Sequence, output_ids: Optional[Sequence] = None) -> None:
    """In place on [rows, vocab] logits: row i keeps only requests[i]'s allowed tokens and loses the tokens
    that would complete one of its bad words. `output_ids[i]`: the row's generated tokens (default: the
    request's `output_token_ids`)."""
    vocab = logits.shape[1]
    mask = None
    rows, cols = [], []
    for i, r in enumerate(requests):
        p = r.params
        if not has_token_rules(p):
            continue
        allowed, bad = _rules(p, vocab)
        if allowed is not None:
            if mask is None:
                mask = torch.full((len(requests), allowed.shape[0]), -1, dtype=torch.int32)
            mask[i] = allowed
        if bad is not None:
            toks = bad.banned(output_ids[i] if output_ids is not None else r.output_token_ids)
            rows += [i] * len(toks)
            cols += toks
    if mask is not None:
        apply_bitmask(logits, mask)
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = _NEG_INF
