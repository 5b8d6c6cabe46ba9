"""Structured outputs: per-request grammars turned into token bitmasks for the sampler.

The engine core owns one `StructuredOutputManager`. A request that carries `StructuredOutputsParams` is added
with `add_request`; its grammar compiles on a worker thread (cached by spec, so a thousand requests with one
schema compile once), and the scheduler holds it back until `is_ready`. Each step, `bitmask(req_ids)` gives one
row per batch row (all ones for a row without a grammar) and `apply_bitmask` sets the forbidden logits to -inf
on the logits' device; after sampling, `accept` advances the row's matcher. Grammar engines sit behind
`backends.GrammarBackend`; xgrammar is the default.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from pageport.core.sampling_params import StructuredOutputsParams
from pageport.core.structured_output.backends import (BACKENDS, GrammarBackend, GrammarMatcher, check_spec,
                                                      make_backend)

__all__ = ["StructuredOutputManager", "StructuredOutputsParams", "apply_bitmask", "bitmask_width", "check_spec",
           "BACKENDS", "GrammarBackend"]

logger = logging.getLogger(__name__)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: bit j of word i allows token 32 * i + j."""
    return (vocab_size + 31) // 32


@dataclass
class _Entry:
    future: Future  # -> a compiled grammar
    matcher: Optional[GrammarMatcher] = None
    failed: bool = False  # a token the grammar refused was accepted anyway


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, backend: str = "xgrammar", max_workers: int = 1):
        self.vocab_size = vocab_size
        self.backend: GrammarBackend = make_backend(backend, tokenizer, vocab_size)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="pageport-grammar")
        self._compiled: dict[tuple, Future] = {}  # spec key -> compiled grammar (or its error)
        self._lock = threading.Lock()
        self._requests: dict[str, _Entry] = {}

    # requests ----------------------------------------------------------------------------------------------
    def add_request(self, req_id: str, params: StructuredOutputsParams) -> None:
        key = params.key()
        with self._lock:
            future = self._compiled.get(key)
            if future is None:
                future = self._pool.submit(self.backend.compile, params)
                self._compiled[key] = future
        self._requests[req_id] = _Entry(future)

    def has_grammar(self, req_id: Optional[str]) -> bool:
        return req_id is not None and req_id in self._requests

    def is_ready(self, req_id: str) -> bool:
        entry = self._requests.get(req_id)
        return entry is None or entry.future.done()

    def error(self, req_id: str) -> Optional[str]:
        """Why the request's grammar did not compile (the request then fails with this as a 400)."""
        entry = self._requests.get(req_id)
        if entry is None or not entry.future.done():
            return None
        exc = entry.future.exception()
        return None if exc is None else str(exc)

    def wait(self, req_id: str, timeout: Optional[float] = None) -> None:
        """Block until the request's grammar compiled (or failed); offline callers that cannot poll."""
        entry = self._requests.get(req_id)
        if entry is not None:
            try:
                entry.future.result(timeout)
            except Exception:  # noqa: BLE001 - error() reports it
                pass

    def _matcher(self, req_id: Optional[str]) -> Optional[GrammarMatcher]:
        entry = self._requests.get(req_id) if req_id is not None else None
        if entry is not None and entry.matcher is not None:  # every step, every row: no future's lock
            return entry.matcher
        if entry is None or not entry.future.done() or entry.future.exception() is not None:
            return None
        if entry.matcher is None:
            entry.matcher = self.backend.matcher(entry.future.result())
        return entry.matcher

    def remove(self, req_id: str) -> None:
        self._requests.pop(req_id, None)

    # one step -------------------------------------------------------------------------------------------------
    def bitmask(self, req_ids: list[Optional[str]]) -> Optional[torch.Tensor]:
        """int32 [len(req_ids), ceil(vocab/32)]: each row the tokens its request may take next (all allowed for
        a row without a grammar, or whose grammar has ended); None when no row has a grammar."""
        rows = [(i, m) for i, r in enumerate(req_ids) if (m := self._matcher(r)) is not None and
                not m.is_terminated()]
        if not rows:
            return None
        mask = torch.full((len(req_ids), bitmask_width(self.vocab_size)), -1, dtype=torch.int32,
                          pin_memory=_pinned())
        fill = getattr(self.backend, "fill_bitmasks", None)
        if fill is not None and len(rows) > 1:
            fill([m for _, m in rows], mask, [i for i, _ in rows])
        else:
            for i, m in rows:
                m.fill_bitmask(mask, i)
        return mask

    def spec_bitmask(self, req_id: str, proposals: list[int]) -> torch.Tensor:
        """int32 [1 + k, width]: the masks of a speculating row's verified positions, the grammar's next tokens
        now and after each proposal it takes. Rows past a proposal it refuses allow everything: that proposal
        gets probability 0 under its row's mask, so verification stops there and samples from that row (the
        rejection sampler's arithmetic holds for any draft distribution); past one that completes the grammar the
        request ends. The matcher is left where it was."""
        m = self._matcher(req_id)
        mask = torch.full((1 + len(proposals), bitmask_width(self.vocab_size)), -1, dtype=torch.int32)
        if m is None or m.is_terminated():
            return mask
        m.fill_bitmask(mask, 0)
        taken = 0
        for t in proposals:
            if not m.accept_token(int(t)):
                break
            taken += 1
            if m.is_terminated():
                break
            m.fill_bitmask(mask, taken)
        if taken:
            m.rollback(taken)
        return mask

    def accept(self, req_id: str, token_ids: list[int]) -> bool:
        """Advance the request's grammar by the sampled tokens; False when one of them breaks it (the matcher
        then stays where it was)."""
        m = self._matcher(req_id)
        if m is None:
            return True
        for t in token_ids:
            if not m.accept_token(int(t)):
                self._requests[req_id].failed = True
                return False
        return True

    def advance(self, req_ids: list[str], tokens: list[int]) -> list[bool]:
        """One sampled token per request, all at once: for each, whether its grammar took the token and is not
        complete (the request goes on)."""
        matchers = [self._matcher(r) for r in req_ids]
        accept = getattr(self.backend, "accept_tokens", None)
        if accept is None or any(m is None for m in matchers):
            return [self.accept(r, [t]) and not self.is_terminated(r) for r, t in zip(req_ids, tokens)]
        took = accept(matchers, tokens)
        for r, ok in zip(req_ids, took):
            if not ok:
                self._requests[r].failed = True
        return [ok and not m.is_terminated() for ok, m in zip(took, matchers)]

    def is_terminated(self, req_id: str) -> bool:
        """The grammar is complete and took its stop token: the request is done."""
        m = self._matcher(req_id)
        return m is not None and m.is_terminated()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _pinned() -> bool:
    """Page-locked host masks where a CUDA device is present: their copy to the device does not block."""
    return torch.cuda.is_available()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[i, t] = -inf where bit t of row i is 0, in place on the logits' device. Rows whose mask allows
    everything (no grammar) are not touched at all; in the others, tokens past the mask's width are forbidden.
    xgrammar's kernel where it has one (CPU float32, CUDA), plain torch elsewhere."""
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must both be "
                         "[rows, ...] with the same rows")
    rows = (bitmask != -1).any(dim=1).nonzero().flatten()  # on the host when the mask is (no device sync)
    if rows.numel() == 0:
        return
    bitmask = bitmask.to(logits.device, non_blocking=True)
    covered = bitmask.shape[1] * 32
    if covered < logits.shape[1]:
        logits[rows, covered:] = float("-inf")
    if not _xgrammar_kernel(logits, bitmask, rows.tolist(), min(covered, logits.shape[1])):
        _torch_apply(logits, bitmask, rows.to(logits.device))


def _xgrammar_kernel(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab: int) -> bool:
    if not (logits.device.type == "cuda" or (logits.device.type == "cpu" and logits.dtype == torch.float32)):
        return False
    try:
        import xgrammar
    except ImportError:
        return False
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab,
                                         indices=None if len(rows) == logits.shape[0] else rows)
    return True


def _torch_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The same on any device: unpack the rows' bits and fill."""
    vocab = min(logits.shape[1], bitmask.shape[1] * 32)
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    every = rows.numel() == logits.shape[0]
    words = bitmask if every else bitmask.index_select(0, rows)
    forbidden = ((words.unsqueeze(-1) >> shifts) & 1).eq(0).flatten(1)[:, :vocab]
    if every:
        logits[:, :vocab].masked_fill_(forbidden, float("-inf"))
        return
    sub = logits.index_select(0, rows)
    sub[:, :vocab].masked_fill_(forbidden, float("-inf"))
    logits.index_copy_(0, rows, sub)
