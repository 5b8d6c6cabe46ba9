"""vLLM's batch-level logits-processor interface: a processor sees the persistent batch change (requests added
at a row, removed, moved) through `update_state(BatchUpdate)` and transforms the whole [rows, vocab] logits in
`apply`. Per-request settings come through `SamplingParams.extra_args`.

`LogitsProcessors` is the engine's side: given each step's requests in row order, it works out the BatchUpdate
(removals, then additions into the freed rows, then moves as swaps or one-way moves) and runs every processor.

Custom processors are classes given when the engine is made, `LLM(logits_processors=[Cls, "module:Cls"])`
(`--logits-processors` on the CLI), as in vLLM v1: the engine core runs in a process of its own, so classes
travel by name (`ProcessorRef`) and each engine core makes its own instances. A class from a script's
`__main__`, or from a module the core cannot import by name, is loaded there from its file.
"""
from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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

        self._outputs: dict[str, list[int]] = {}  # request id -> its output ids, the list processors hold

    def validate(self, params: SamplingParams) -> None:
        for p in self.processors:
            type(p).validate_params(params)

    def step_requests(self, requests: Sequence) -> None:
        """`step` from the engine's Request objects (row order). Each request's output ids are one list that
        grows as it generates, handed to the processors when it joins the batch (vLLM's live reference)."""
        outs = self._outputs
        ids = [r.request_id for r in requests]
        params, prompts = {}, {}
        present = set(self.rows)
        for r in requests:
            rid = r.request_id
            lst = outs.get(rid)
            if lst is None or rid not in present:
                lst = outs[rid] = list(r.token_ids[r.num_prompt_tokens:])
                params[rid], prompts[rid] = r.params, r.prompt_token_ids
            else:
                have = r.num_prompt_tokens + len(lst)
                if len(r.token_ids) > have:
                    lst.extend(r.token_ids[have:])
        self.step(ids, params, prompts, outs)
        if len(outs) > len(ids):  # requests gone from the batch: their lists are made again if they return
            keep = set(ids)
            for rid in [k for k in outs if k not in keep]:
                del outs[rid]

    def active(self, all_greedy: bool) -> bool:
        """Whether `apply` would run any processor (greedy batches skip argmax-invariant ones)."""
        return any(not (all_greedy and p.is_argmax_invariant()) for p in self.processors)

    def step(self, req_ids: Sequence[str], params: dict, prompt_ids: dict, output_ids: dict) -> None:
        """Tell the processors about this step's batch: `req_ids` in row order; the dicts (by request id) give a
        new request's SamplingParams, prompt token ids and its growing list of output token ids."""
        update = self._diff(list(req_ids), params, prompt_ids, output_ids)
        for p in self.processors:
            p.update_state(update)

    def apply(self, logits: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
        for p in self.processors:
            if not (all_greedy and p.is_argmax_invariant()):  # cannot change an argmax: greedy rows skip it
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


# loading the classes ------------------------------------------------------------------------------------------
_METHODS = ("apply", "is_argmax_invariant", "update_state")


@dataclass(frozen=True)
class ProcessorRef:
    """A processor class by name: `module` + `qualname`, and the module's file for a core that cannot import
    the module by name (a script's __main__, a test module on the front end's sys.path only)."""
    module: str
    qualname: str
    file: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"

    def load(self) -> type:
        mod = None
        if self.module != "__main__":
            try:
                mod = importlib.import_module(self.module)
            except ImportError:
                if self.file is None:
                    raise
        if mod is None:
            mod = _module_from_file(self.file, self.module)
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _module_from_file(path: Optional[str], name: str):
    if path is None:
        raise ImportError(f"cannot import {name!r}")
    # a private name: the file's `if __name__ == "__main__":` block does not run (as multiprocessing's spawn)
    alias = f"_pageport_lp_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    mod = sys.modules.get(alias)
    if mod is None:
        spec = importlib.util.spec_from_file_location(alias, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in sys.path:  # its sibling modules import as they do when the file runs as a script
            sys.path.append(folder)
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(alias, None)
            raise
    return mod


def processor_ref(entry) -> ProcessorRef:
    """A class, "module:Class", "module.Class" or a ProcessorRef -> a ProcessorRef whose class loads here.
    ValueError naming logits_processors when it does not, or is not a logits processor."""
    if isinstance(entry, ProcessorRef):
        ref = entry
    elif isinstance(entry, type):
        mod = sys.modules.get(entry.__module__)
        ref = ProcessorRef(entry.__module__, entry.__qualname__, getattr(mod, "__file__", None))
    elif isinstance(entry, str) and entry.strip():
        text = entry.strip()
        if ":" in text:
            module, _, qualname = text.rpartition(":")
        else:
            module, _, qualname = text.rpartition(".")
        if not module or not qualname:
            raise ValueError(f"logits_processors: {entry!r} is not 'module:Class' or 'module.Class'")
        ref = ProcessorRef(module, qualname)
    else:
        raise ValueError(f"logits_processors entries must be LogitsProcessor classes or 'module:Class' names, "
                         f"got {entry!r}")
    try:
        cls = ref.load()
    except Exception as e:  # noqa: BLE001 - reported as this option's fault
        raise ValueError(f"logits_processors: cannot load {str(ref)!r}: {type(e).__name__}: {e}") from None
    check_processor_class(cls, str(ref))
    return ref


def check_processor_class(cls, name: str) -> None:
    if not isinstance(cls, type) or any(not callable(getattr(cls, m, None)) for m in _METHODS):
        raise ValueError(f"logits_processors: {name} is not a logits processor class (vLLM's interface: "
                         f"{', '.join(_METHODS)}; subclass pageport.core.logits_processors.LogitsProcessor)")
    if "<locals>" in getattr(cls, "__qualname__", ""):
        raise ValueError(f"logits_processors: {name} is defined inside a function; the engine core loads "
                         "classes by name, so define it at module level")


def processor_refs(entries) -> Optional[list[ProcessorRef]]:
    """EngineConfig.logits_processors, checked and made transportable (None when there are none)."""
    if not entries:
        return None
    if isinstance(entries, (str, type)):
        entries = [entries]
    return [processor_ref(e) for e in entries]


def processor_classes(refs) -> list[type]:
    return [r.load() for r in (refs or ())]


def build_logits_processors(config, device) -> Optional[LogitsProcessors]:
    """The engine core's LogitsProcessors for `config.logits_processors` (None without any)."""
    refs = getattr(config, "logits_processors", None)
    if not refs:
        return None
    pin = device.type == "cuda" and torch.cuda.is_available()
    return LogitsProcessors(processor_classes(refs), config, device, pin)


def needs_host_state(params: SamplingParams, has_processors: bool) -> bool:
    """A request whose every step must see its output ids up to date on the host (no step of it in flight):
    a bad word of several tokens is matched against the last ones; custom processors read them, for the
    requests that configure them (extra_args)."""
    from pageport.core.structured_output.token_masks import needs_history
    return (has_processors and bool(params.extra_args)) or needs_history(params)
