"""vLLM's engine names over pageport's own classes, so that a vLLM script runs with `vllm` changed to `pageport`:
LLMEngine.from_engine_args, AsyncLLM (AsyncLLMEngine), LLM with get_default_sampling_params and Hub ids from
the local cache, cleanup_dist_env_and_memory. The argument side (EngineArgs, FlexibleArgumentParser) is in
`arg_utils`."""
from __future__ import annotations

import gc
from typing import AsyncIterator, Optional

from pageport.core.arg_utils import (_CONFIG_FIELDS, AsyncEngineArgs, EngineArgs, FlexibleArgumentParser,
                                     check_tokenizer_mode, closest, default_sampling_params, resolve_hub_model)
from pageport.core.async_engine import AsyncLLMEngine as _AsyncLLMEngine
from pageport.core.engine import LLMEngine as _LLMEngine
from pageport.core.llm import LLM as _LLM
from pageport.core.sampling_params import (RequestOutputKind, SamplingParams, check_engine_features,
                                           engine_features)

__all__ = ["LLM", "LLMEngine", "AsyncLLM", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs",
           "FlexibleArgumentParser", "cleanup_dist_env_and_memory"]


# engines ------------------------------------------------------------------------------------------------------
class LLM(_LLM):
    """pageport's LLM, taking Hub ids from the local cache and vLLM's model-source keywords."""

    def __init__(self, model: Optional[str] = None, *, download_dir: Optional[str] = None,
                 revision: Optional[str] = None, tokenizer_mode: str = "auto", generation_config: str = "auto",
                 override_generation_config: Optional[dict] = None, **kwargs):
        check_tokenizer_mode(tokenizer_mode)
        unknown = [k for k in kwargs if k not in _CONFIG_FIELDS]
        if unknown:
            raise TypeError(f"LLM got an unknown option {unknown[0]!r}{closest(unknown[0], sorted(_CONFIG_FIELDS))}")
        model = resolve_hub_model(model, download_dir, revision)
        self._generation = (generation_config, override_generation_config)
        super().__init__(model, **kwargs)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, lora_request=None):
        # what the engine does not apply is refused, never silently left out
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params]
        supported = engine_features(self.engine)
        for p in params:
            if p is not None:
                check_engine_features(p, supported)
        return super().generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's own sampling defaults (generation_config.json), as vLLM gives them."""
        return default_sampling_params(self.config.model, *self._generation)


class LLMEngine(_LLMEngine):
    def add_request(self, request_id, prompt, params: SamplingParams, *args, **kwargs):
        check_engine_features(params, engine_features(self))
        return super().add_request(request_id, prompt, params, *args, **kwargs)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), **kwargs)


class AsyncLLM(_AsyncLLMEngine):
    """The async engine under vLLM's names: `from_engine_args`, and `generate(prompt, sampling_params,
    request_id)` honouring the output kind (FINAL_ONLY: one output when the request finishes)."""

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs) -> "AsyncLLM":
        return cls(_LLMEngine(engine_args.create_engine_config()), **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs) -> "AsyncLLM":
        return cls(_LLMEngine(config), **kwargs)

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: Optional[str] = None,
                       **kwargs) -> AsyncIterator:
        check_engine_features(sampling_params, engine_features(self))
        final_only = sampling_params.output_kind == RequestOutputKind.FINAL_ONLY
        async for out in super().generate(prompt, sampling_params, request_id, **kwargs):
            if not final_only or out.finished:
                yield out

    async def get_tokenizer(self):
        return self.tokenizer


AsyncLLMEngine = AsyncLLM


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """Free what a finished engine left: the torch.distributed group, Python garbage, cached device memory."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    from pageport.platforms import resolve_platform

    try:
        resolve_platform("auto").empty_cache()
    except Exception:  # noqa: BLE001 - nothing to free on a platform that cannot start
        pass
