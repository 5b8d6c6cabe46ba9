"""Per-request token rules that are not grammars, in the same bitmask layout as the grammars' so that one
`apply_bitmask` applies both: `allowed_token_ids` (a fixed row), and `bad_words` (the tokens that would
complete a banned word after what the request has generated so far)."""
from __future__ import annotations

from typing import Sequence

import torch

from pageport.core.structured_output import bitmask_width


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


class BadWords:
    """vLLM's bad_words: each word as tokenized alone and after a space; a one-token word is never generated, a
    longer one's last token is banned right after its other tokens."""

    def __init__(self, tokenizer, words: Sequence[str]):
        seqs = set()
        for w in words:
            for text in (w, " " + w.lstrip()):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs.add(ids)
        self.sequences = sorted(seqs)

    def banned(self, output_ids: Sequence[int]) -> list[int]:
        """The tokens that may not come next after `output_ids`."""
        out = set()
        for seq in self.sequences:
            prefix = seq[:-1]
            if not prefix or tuple(output_ids[-len(prefix):]) == prefix:
                out.add(seq[-1])
        return sorted(out)
