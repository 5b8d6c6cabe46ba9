"""LoRA in the engine: the request's adapter (`LoRARequest`) and the core's resident slots (`LoRASlots`).

The front end only names an adapter (name, id, path); the engine core reads and checks its folder when the
request arrives (a bad folder fails that request alone), keeps the read weights on the host (an LRU of
`max_cpu_loras` adapters no live request uses), and before each step writes every adapter the step needs into
one of the model's `max_loras` slots, evicting the least recently used slot no row of the step uses. The
scheduler never lets more distinct adapters run than there are slots, so a step always finds room.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: `lora_int_id` (>= 1) identifies the adapter; `lora_path` is a PEFT folder."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} has no lora_path")

    # vLLM's short names
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path

    def to_wire(self) -> list:
        return [self.lora_name, self.lora_int_id, self.lora_path]


class LoRASlots:
    """The core's view of the model's LoRA slots (1..max_loras) and of the adapters read on the host."""

    def __init__(self, lora_model, max_cpu_loras: Optional[int] = None):
        self.model = lora_model  # models/lora LoRAModel
        self.max_loras = lora_model.max_loras
        self.max_cpu = max(max_cpu_loras or self.max_loras, self.max_loras)
        self.host: collections.OrderedDict[int, dict] = collections.OrderedDict()  # id -> read weights (LRU)
        self.paths: dict[int, str] = {}  # id -> the folder it was read from
        self.users: collections.Counter = collections.Counter()  # id -> live requests
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # id -> slot, LRU first
        self.free = list(range(self.max_loras, 0, -1))
        self.dropping: set[int] = set()  # unloaded while requests still use them
        self.num_loads = 0  # adapters written into a slot (a test counts the swaps)

    def load(self, lora_id: int, path: str) -> None:
        """Read and check the folder (ValueError if bad) unless it is held already; no request uses it yet."""
        if lora_id in self.host and self.paths.get(lora_id) != path:
            raise ValueError(f"LoRA id {lora_id} is already loaded from {self.paths[lora_id]!r}, not {path!r}")
        if lora_id not in self.host:
            self.host[lora_id] = self.model.read(path)
            self.paths[lora_id] = path
        self.host.move_to_end(lora_id)
        self.dropping.discard(lora_id)
        self._trim()

    def acquire(self, lora_id: int, path: str) -> None:
        """A request with this adapter arrived: its weights are held on the host until it ends."""
        self.users[lora_id] += 1  # first, so that trimming keeps it
        try:
            self.load(lora_id, path)
        except BaseException:
            self.release(lora_id)
            raise

    def release(self, lora_id: int) -> None:
        self.users[lora_id] -= 1
        if self.users[lora_id] <= 0:
            del self.users[lora_id]
            if lora_id in self.dropping:
                self.drop(lora_id)
        self._trim()

    def _trim(self) -> None:
        """Keep at most max_cpu adapters on the host, never one a live request needs."""
        for lid in list(self.host):
            if len(self.host) <= self.max_cpu:
                break
            if not self.users.get(lid):
                self.drop(lid)

    def drop(self, lora_id: int) -> None:
        """Forget an adapter (unload): its slot becomes free; a later request reads the folder again."""
        if self.users.get(lora_id):
            self.dropping.add(lora_id)  # still in use: forgotten once its last request ends
            return
        self.dropping.discard(lora_id)
        self.host.pop(lora_id, None)
        self.paths.pop(lora_id, None)
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            self.model.clear(slot)
            self.free.append(slot)

    def assign(self, lora_ids: set[int]) -> dict[int, int]:
        """Slots for the adapters of the coming step (at most max_loras of them), loading what is missing."""
        out = {}
        missing = [lid for lid in lora_ids if lid not in self.slot_of]
        for lid in lora_ids:
            if lid in self.slot_of:
                self.slot_of.move_to_end(lid)
        for lid in missing:
            if self.free:
                slot = self.free.pop()
            else:  # the least recently used slot that this step does not use
                victim = next(v for v in self.slot_of if v not in lora_ids)
                slot = self.slot_of.pop(victim)
            self.model.write(slot, self.host[lid])
            self.num_loads += 1
            self.slot_of[lid] = slot
        for lid in lora_ids:
            out[lid] = self.slot_of[lid]
        return out
