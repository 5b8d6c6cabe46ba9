"""N-gram prompt lookup: propose the tokens that followed the last occurrence of the context's suffix.

For each decoding request, the last n tokens of prompt + output (n from prompt_lookup_max down to
prompt_lookup_min) are looked for earlier in the same sequence; the proposal is the k tokens that followed
the most recent earlier match that has k tokens after it (else the earliest match, whose tail is longest).
No model runs. Each request keeps an index of its n-grams (`NgramIndex`), extended by the tokens it gained since
the last step, so a step's lookup costs the same at any sequence length.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

_B = 0x9E3779B97F4A7C15  # odd multiplier of the polynomial hash (mod 2**64)
_MASK = (1 << 64) - 1


def _window_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """The hash of every length-n window of `tokens` (uint64 arithmetic wraps: mod 2**64)."""
    m = len(tokens) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for i in range(n):
        h = h * np.uint64(_B) + tokens[i:i + m]
    return h


def _hash(window: Sequence[int]) -> int:
    h = 0
    for t in window:
        h = (h * _B + t) & _MASK
    return h


class NgramIndex:
    """The latest start of each n-gram of one growing sequence, over the windows with k tokens after them (they
    stay that way as the sequence grows). Windows nearer the end are few and scanned at lookup. Keys are hashes;
    a hit is checked against the tokens (a collision costs a proposal, never a wrong one: proposals are verified)."""

    BULK = 64  # windows at once that are hashed in numpy rather than one by one

    def __init__(self, min_n: int, max_n: int, k: int):
        self.ns = range(min_n, max_n + 1)
        self.k = k
        self.latest: dict[int, dict[int, int]] = {n: {} for n in self.ns}
        self.indexed = dict.fromkeys(self.ns, 0)  # starts 0 .. indexed[n] - 1 are in latest[n]

    def extend(self, seq: Sequence[int]) -> None:
        for n in self.ns:
            lo, hi = self.indexed[n], len(seq) - n - self.k + 1  # starts with k tokens after their window
            if hi <= lo:
                continue
            d = self.latest[n]
            if hi - lo >= self.BULK:
                h = _window_hashes(np.asarray(seq[lo:hi + n - 1], dtype=np.uint64), n)
                d.update(zip(h.tolist(), range(lo, hi)))  # in order: later starts overwrite earlier ones
            else:
                for s in range(lo, hi):
                    d[_hash(seq[s:s + n])] = s
            self.indexed[n] = hi

    def lookup(self, seq: Sequence[int], n: int, k: int) -> Optional[int]:
        """Where the proposal starts for the suffix of length n (k <= the index's k): after its latest earlier
        occurrence followed by k whole tokens, else after its earliest; None when it never occurred."""
        length = len(seq)
        suffix = seq[length - n:]
        recent = [s for s in range(self.indexed[n], length - n) if seq[s:s + n] == suffix]
        full = [s for s in recent if s + n + k <= length]
        if full:
            return full[-1] + n
        s = self.latest[n].get(_hash(suffix))
        if s is not None and seq[s:s + n] == suffix:
            return s + n
        return recent[0] + n if recent else None  # no indexed one: the earliest is among the recent


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 4, prompt_lookup_min: int = 2):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        self.k = num_speculative_tokens
        self.max_n = prompt_lookup_max
        self.min_n = prompt_lookup_min

    def new_index(self, k: int | None = None) -> NgramIndex:
        return NgramIndex(self.min_n, self.max_n, self.k if k is None else k)

    def propose(self, token_ids: Sequence[int], k: int | None = None, index: NgramIndex | None = None) -> list[int]:
        """Up to k (default num_speculative_tokens) tokens that followed the latest earlier occurrence of
        the longest suffix of token_ids of length in [min_n, max_n]; [] where there is none. `index`: the
        sequence's index from earlier calls (token_ids only grew since), extended here; None: one built now."""
        k = self.k if k is None else k
        length = len(token_ids)
        if k <= 0 or length < self.min_n + 1:
            return []
        if index is None or k > index.k:
            index = self.new_index(k)
        index.extend(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = index.lookup(token_ids, n, k)
            if start is not None:
                return list(token_ids[start:start + k])
        return []
