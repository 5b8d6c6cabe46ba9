"""The two interfaces every backend implements: Platform and AttentionBackend."""
from __future__ import annotations

import os
import platform as _pyplatform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from pageport.platforms.ops import Ops

if TYPE_CHECKING:
    from pageport.core.config import EngineConfig


@dataclass
class AttentionMetadata:
    """One step's ragged batch, in the variable-length convention.

    Tokens of all sequences are flattened; sequence i owns query rows
    query_start_loc[i]:query_start_loc[i+1] and has seq_lens[i] tokens of context
    (those already cached plus this step's). Slot = block_id * block_size + offset.
    The `_cpu` lists mirror the device tensors so host code never has to sync.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    """Paged attention over a ragged batch for one model's attention shape."""

    name: ClassVar[str] = "base"

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: Optional[int] = None, softcap: Optional[float] = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache; [0] is K, [1] is V by default."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, metadata: AttentionMetadata) -> Any:
        """Backends that need extra per-step tensors derive them here, once per step."""
        return metadata

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for this step's tokens -> out [T, Hq, D].

        Writes k/v into the cache at metadata.slot_mapping, then attends causally by
        absolute position over each sequence's cached context.
        """
        raise NotImplementedError


class Platform:
    """Everything the device-agnostic core needs to know about one kind of hardware.

    Subclasses override what differs; every method has a working default.
    """

    name: ClassVar[str] = "base"
    device_type: ClassVar[str] = "cpu"  # torch device string
    priority: ClassVar[int] = 0  # --device auto takes the available platform of highest priority
    dist_backend: ClassVar[str] = "gloo"
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    # a step's token budget when --max-num-batched-tokens is not given (with chunked prefill)
    default_max_num_batched_tokens: ClassVar[int] = 2048

    ops: Ops = Ops()

    # identity -------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when usable here, else one line saying why not. Cheap; never raises."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    # device facts -----------------------------------------------------------
    @property
    def default_dtype(self) -> torch.dtype:
        return self.supported_dtypes[0]

    def device_count(self) -> int:
        return 1

    def device_name(self) -> str:
        return _pyplatform.processor() or _pyplatform.machine()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def describe(self) -> dict[str, Any]:
        """Facts for `pageport platforms` and logs."""
        return {"device": self.device_name()}

    # runtime ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def set_device(self, index: int = 0) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def empty_cache(self) -> None:
        pass

    def all_reduce(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """Sum `x` in place over the tensor-parallel group (after each row-parallel linear). A platform with
        a faster collective (a custom all-reduce kernel) overrides it; the group is torch.distributed's,
        made with `dist_backend` by the executor (None: every rank; with pipeline stages, the stage's ranks)."""
        torch.distributed.all_reduce(x, group=group)
        return x

    # configuration --------------------------------------------------------------
    def check_config(self, config: "EngineConfig") -> None:
        """Validate and fill platform-dependent options in place (dtype, block size...)."""
        if config.dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ValueError(f"{self.name} does not support dtype {config.dtype}; supported: {names}")

    def kv_cache_bytes(self, config: "EngineConfig", model_bytes: int, peak_activation_bytes: int) -> int:
        """Bytes to give the KV cache once the model is loaded and profiled."""
        if config.kv_cache_memory_bytes:
            return config.kv_cache_memory_bytes
        free, total = self.memory_info()
        return max(0, int(total * config.gpu_memory_utilization) - (total - free) - peak_activation_bytes)

    def attention_backend(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                          sliding_window: Optional[int] = None,
                          softcap: Optional[float] = None) -> AttentionBackend:
        raise NotImplementedError(f"platform {self.name} offers no attention backend")

    def mla_attention_backend(self, num_heads: int, kv_lora_rank: int, rope_dim: int,
                              scale: float) -> AttentionBackend:
        """Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents; plain torch by default."""
        from pageport.platforms.mla import TorchMLAAttention
        return TorchMLAAttention(num_heads, kv_lora_rank, rope_dim, scale)

    def compile(self, fn):
        """Wrap a pure tensor function of a model (no attention, no Python-side metadata; e.g. norm + qkv +
        rotary of a layer) for this platform's compiler. Identity unless the platform opts in."""
        return fn

    def graph_runner(self, model: Any, kv_caches: list[torch.Tensor],
                     config: "EngineConfig") -> Optional["GraphRunner"]:
        """Optional: something that runs steps faster than eager (CUDA/HIP graphs, XLA buckets)."""
        return None


class GraphRunner:
    """Runs the model for the steps it can (captured graphs, compiled shape buckets)."""

    def capture(self) -> None:
        """Called once after the KV cache is allocated, before the first request."""

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> Optional[torch.Tensor]:
        """Hidden states [num_actual_tokens, hidden] for this step, or None to let the runner go eager."""
        return None

    def run_lora(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 lora_index: torch.Tensor) -> Optional[torch.Tensor]:
        """The same for a step with LoRA rows (`lora_index`: each token's slot); None: eager."""
        return None
