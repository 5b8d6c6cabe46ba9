"""Multi-LoRA: PEFT adapter folders loaded into resident slots, applied per token in one batch.

`enable_lora(model, max_loras, max_rank)` wraps the decoder's projections (qkv_proj, o_proj, gate_up_proj,
down_proj) in `LoRALinear`s whose stacked weights hold `max_loras` adapters (slot 0 = the base model, all zeros,
never computed). `LoRAModel.load(slot, path)` reads adapter_config.json + adapter_model.safetensors, checks rank,
target modules and shapes (ValueError otherwise) and fills the slot; the fused q|k|v and gate|up projections take
PEFT's q_proj/k_proj/v_proj and gate_proj/up_proj as slices (A stacked along the rank, B block-diagonal).
`set_token_index(idx)` gives the step's per-token slot; the platform's `ops.lora_apply` adds
scale * (x A^T) B^T for the rows of each active slot (rows of slot 0 pay nothing).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from torch import nn

# our fused module -> PEFT target names, in output order
_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
           "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_TARGETS = {t: fused for fused, ts in _SLICES.items() for t in ts}


class _State:
    """The step's per-token slot index, shared by every LoRALinear of a model."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None  # [T] int, or None: no adapter in this step
        self.slots: list[int] = []  # the nonzero slots present


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slices: list[tuple[int, int]], max_loras: int, max_rank: int,
                 state: _State, ops):
        super().__init__()
        self.base, self.state, self.ops = base, state, ops
        self.slices = slices  # (output offset, size) per PEFT target, in _SLICES order
        w = base.weight
        n = len(slices)
        dev, dt = w.device if w.device.type != "meta" else torch.device("cpu"), torch.get_default_dtype()
        dt = w.dtype if w.dtype.is_floating_point and w.device.type != "meta" else dt
        if dev.type == "cpu":  # small bf16 GEMMs are ~4x slower than float32 ones on the CPU (oneDNN): keep float32
            dt = torch.float32
        self.register_buffer("lora_a", torch.zeros(max_loras + 1, n * max_rank, base.input_size, dtype=dt, device=dev))
        self.register_buffer("lora_b", torch.zeros(max_loras + 1, base.output_size, n * max_rank, dtype=dt,
                                                   device=dev))
        self.max_rank = max_rank

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(self, x):
        y = self.base(x)
        st = self.state
        if st.index is None or not st.slots:
            return y
        return self.ops.lora_apply(y, x, self.lora_a, self.lora_b, st.index, st.slots)


class LoRAModel:
    """The LoRA side of one model: its wrapped layers, slots and the step's token index."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, ops):
        self.max_loras, self.max_rank = max_loras, max_rank
        self.state = _State()
        self.layers: dict[str, LoRALinear] = {}  # "model.layers.{i}.{self_attn|mlp}.{fused}"
        for name, module in list(model.named_modules()):
            for fused in _SLICES:
                child = getattr(module, fused, None)
                if child is None or isinstance(child, LoRALinear) or not hasattr(child, "output_shards"):
                    continue
                shards = child.output_shards()
                keys = list(shards)
                slices = [(shards[k][0], shards[k][1]) for k in keys]
                wrapped = LoRALinear(child, slices, max_loras, max_rank, self.state, ops)
                setattr(module, fused, wrapped)
                self.layers[f"{name}.{fused}"] = wrapped
        if not self.layers:
            raise ValueError("this model has no projections LoRA can be applied to")
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "pre"):  # the LoRA layers pick rows at run time: stay eager
            from pageport.models.llama import post_attention, pre_attention
            inner.pre, inner.post = pre_attention, post_attention

    def set_token_index(self, index: Optional[torch.Tensor], slots: Optional[list[int]] = None) -> None:
        """The step's per-token slot; `slots`: its nonzero slots when the caller knows them (no device read)."""
        if index is None:
            self.state.index, self.state.slots = None, []
            return
        if slots is None:
            slots = sorted(int(s) for s in torch.unique(index).tolist() if s)
        slots = [s for s in slots if s]
        self.state.index, self.state.slots = (index if slots else None), slots

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()

    def read(self, path: str) -> dict[str, list]:
        """Validate a PEFT folder against this model: {our layer: [(slice, A, B*scale) ...]}. ValueError if bad."""
        if not os.path.isdir(path):
            raise ValueError(f"LoRA adapter path {path!r} is not a folder")
        cfg_path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        r = int(cfg.get("r", 0))
        if not 0 < r <= self.max_rank:
            raise ValueError(f"LoRA adapter {path!r} has rank {r}, more than max_lora_rank={self.max_rank}")
        if cfg.get("use_dora") or cfg.get("modules_to_save"):
            raise ValueError(f"LoRA adapter {path!r}: DoRA and modules_to_save are not supported")
        alpha = float(cfg.get("lora_alpha", r))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        unknown = [t for t in targets if t not in _TARGETS]
        if unknown:
            raise ValueError(f"LoRA adapter {path!r} targets unsupported modules {unknown}; "
                             f"supported: {sorted(_TARGETS)}")
        st = os.path.join(path, "adapter_model.safetensors")
        if os.path.isfile(st):
            from safetensors.torch import load_file
            tensors = load_file(st)
        elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
            tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors")
        pat = re.compile(r"(?:.*?)(model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.lora_([AB])\.weight$")
        found: dict[tuple[str, str], dict] = {}
        for name, t in tensors.items():
            m = pat.match(name)
            if m is None:
                raise ValueError(f"LoRA adapter {path!r}: unexpected tensor {name!r}")
            prefix, target, ab = m.groups()
            if target not in _TARGETS:
                raise ValueError(f"LoRA adapter {path!r}: unsupported target module {target!r}")
            found.setdefault((prefix, target), {})[ab] = t
        out: dict[str, list] = {}
        for (prefix, target), ab in found.items():
            fused = _TARGETS[target]
            layer = self.layers.get(f"{prefix}.{fused}")
            if layer is None or set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {path!r}: {prefix}.{target} does not fit this model")
            i = _SLICES[fused].index(target)
            a, b = ab["A"], ab["B"]
            off, size = layer.slices[i]
            if tuple(a.shape) != (r, layer.base.input_size) or tuple(b.shape) != (size, r):
                raise ValueError(f"LoRA adapter {path!r}: {prefix}.{target} has shapes A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)}; this model needs A ({r}, {layer.base.input_size}), "
                                 f"B ({size}, {r})")
            out.setdefault(f"{prefix}.{fused}", []).append((i, a, b * scale))
        if not out:
            raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights")
        return out

    def load(self, slot: int, path: str) -> None:
        self.write(slot, self.read(path))  # validated before the slot is touched

    def write(self, slot: int, weights: dict[str, list]) -> None:
        """Fill a slot with what `read` returned (the engine keeps that on the host between loads)."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"LoRA slot {slot} is outside 1..{self.max_loras}")
        self.clear(slot)
        R = self.max_rank
        for name, parts in weights.items():
            layer = self.layers[name]
            for i, a, b in parts:
                r = a.shape[0]
                off, size = layer.slices[i]
                layer.lora_a[slot, i * R:i * R + r] = a.to(layer.lora_a.dtype)
                layer.lora_b[slot, off:off + size, i * R:i * R + r] = b.to(layer.lora_b.dtype)


def enable_lora(model: nn.Module, max_loras: int, max_rank: int, ops=None) -> LoRAModel:
    if ops is None:
        from pageport.platforms.ops import Ops
        ops = Ops()
    model.lora = LoRAModel(model, max_loras, max_rank, ops)
    return model.lora
