"""N-gram prompt lookup: propose the tokens that followed the last occurrence of the context's suffix.

For each decoding request, the last n tokens of prompt + output (n from prompt_lookup_max down to
prompt_lookup_min) are looked for earlier in the same sequence; the proposal is the k tokens that followed
the most recent earlier match that has k tokens after it (else the earliest match, whose tail is longest). No model runs: the cost is a vectorised scan of the sequence.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 4, prompt_lookup_min: int = 2):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        self.k = num_speculative_tokens
        self.max_n = prompt_lookup_max
        self.min_n = prompt_lookup_min

    def propose(self, token_ids: Sequence[int] | np.ndarray, k: int | None = None) -> list[int]:
        """Up to k (default num_speculative_tokens) tokens that followed the latest earlier occurrence of
        the longest suffix of token_ids of length in [min_n, max_n]; [] where there is none."""
        k = self.k if k is None else k
        seq = np.asarray(token_ids, dtype=np.int64)
        length = len(seq)
        if k <= 0 or length < self.min_n + 1:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            pattern = seq[length - n:]
            # windows starting at 0 .. length-n-1: each has at least one token after it, and excludes the suffix
            windows = sliding_window_view(seq[:length - 1], n)
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            if hits.size:
                full = hits[hits + n + k <= length]  # matches followed by k whole tokens: the latest of them,
                start = int(full[-1] if full.size else hits[0]) + n  # else the earliest (the longest tail)
                return seq[start:start + k].tolist()
        return []
