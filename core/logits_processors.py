"""vLLM's batch-level logits-processor interface: a processor sees the persistent batch change (requests added
at a row, removed, moved) through `update_state(BatchUpdate)` and transforms the whole [rows, vocab] logits in
`apply`. Per-request settings come through `SamplingParams.extra_args`.

`LogitsProcessors` is the engine's side: given each step's requests in row order, it works out the BatchUpdate
(removals, then additions into the freed rows, then moves as swaps or one-way moves) and runs every processor.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from pageport.core.sampling_params import SamplingParams


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()  # row a's request now sits at row b (b's old one is gone)
    SWAP = enum.auto()  # rows a and b exchange their requests


@dataclass
class BatchUpdate:
    """Applied in this order: `removed` rows, `added` (row, params, prompt ids, output ids — the last a list
    that grows as the request generates), then `moved` (a, b, directionality)."""
    batch_size: int
    removed: list[int] = field(default_factory=list)
    added: list[tuple[int, SamplingParams, Optional[list[int]], list[int]]] = field(default_factory=list)
    moved: list[tuple[int, int, MoveDirectionality]] = field(default_factory=list)


class LogitsProcessor(ABC):
    """Subclass with vLLM's constructor and the three methods."""

    def __init__(self, config, device: torch.device, is_pin_memory: bool):
        pass

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The batch's logits (rows in batch order) after this processor; in place or new."""

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when it never changes the most likely token (then greedy rows may skip it)."""

    @abstractmethod
    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        """The batch changed (None: it did not)."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Raise ValueError for per-request settings (extra_args) this processor cannot take."""


class LogitsProcessors:
    """The processors of one engine, fed the batch each step."""

    def __init__(self, classes: Sequence[type[LogitsProcessor]], config=None, device: Optional[torch.device] = None,
                 is_pin_memory: bool = False):
        self.processors = [cls(config, device or torch.device("cpu"), is_pin_memory) for cls in classes]
        self.rows: list[Optional[str]] = []  # request id per row, as the processors know it

    def validate(self, params: SamplingParams) -> None:
        for p in self.processors:
            type(p).validate_params(params)

    def step(self, req_ids: Sequence[str], params: dict, prompt_ids: dict, output_ids: dict) -> None:
        """Tell the processors about this step's batch: `req_ids` in row order; the dicts (by request id) give a
        new request's SamplingParams, prompt token ids and its growing list of output token ids."""
        update = self._diff(list(req_ids), params, prompt_ids, output_ids)
        for p in self.processors:
            p.update_state(update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for p in self.processors:
            logits = p.apply(logits)
        return logits

    def _diff(self, new: list[str], params, prompt_ids, output_ids) -> Optional[BatchUpdate]:
        old = self.rows
        if new == old:
            return None
        wanted = set(new)
        update = BatchUpdate(batch_size=len(new))
        rows: list[Optional[str]] = list(old) + [None] * max(0, len(new) - len(old))
        for i, r in enumerate(old):  # gone
            if r not in wanted:
                update.removed.append(i)
                rows[i] = None
        present = set(r for r in rows if r is not None)
        free = [i for i, r in enumerate(rows) if r is None]
        for r in new:  # arrivals take the lowest free rows
            if r not in present:
                i = free.pop(0)
                rows[i] = r
                update.added.append((i, params[r], prompt_ids.get(r), output_ids[r]))
        for target, r in enumerate(new):  # then into place: swaps, or one-way into a free row
            at = rows.index(r)
            if at == target:
                continue
            if rows[target] is None:
                update.moved.append((at, target, MoveDirectionality.UNIDIRECTIONAL))
                rows[target], rows[at] = r, None
            else:
                update.moved.append((at, target, MoveDirectionality.SWAP))
                rows[target], rows[at] = r, rows[target]
        self.rows = rows[:len(new)]
        return update
