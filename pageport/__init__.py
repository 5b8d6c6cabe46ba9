"""pageport: LLM inference and serving with paged attention on pluggable hardware platforms."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pageport")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# name -> module it lives in; vLLM's names, so that a vLLM script runs with `vllm` changed to `pageport`
_EXPORTS = {
    "LLM": "pageport.core.compat",
    "LLMEngine": "pageport.core.compat",
    "AsyncLLM": "pageport.core.compat",
    "AsyncLLMEngine": "pageport.core.compat",
    "EngineArgs": "pageport.core.arg_utils",
    "AsyncEngineArgs": "pageport.core.arg_utils",
    "FlexibleArgumentParser": "pageport.core.arg_utils",
    "cleanup_dist_env_and_memory": "pageport.core.compat",
    "SamplingParams": "pageport.core.sampling_params",
    "StructuredOutputsParams": "pageport.core.sampling_params",
    "GuidedDecodingParams": "pageport.core.sampling_params",
    "RequestOutputKind": "pageport.core.sampling_params",
    "RequestOutput": "pageport.core.outputs",
    "CompletionOutput": "pageport.core.outputs",
    "BeamSearchParams": "pageport.core.llm",
    "LoRARequest": "pageport.core.lora",
    "EngineConfig": "pageport.core.config",
    # pooling models
    "PoolingParams": "pageport.core.pooling",
    "PoolingOutput": "pageport.core.pooling",
    "PoolingRequestOutput": "pageport.core.pooling",
    "EmbeddingOutput": "pageport.core.pooling",
    "EmbeddingRequestOutput": "pageport.core.pooling",
    "ClassificationOutput": "pageport.core.pooling",
    "ClassificationRequestOutput": "pageport.core.pooling",
    "ScoringOutput": "pageport.core.pooling",
    "ScoringRequestOutput": "pageport.core.pooling",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    # Lazy, so `import pageport` stays cheap for the CLI and for plugins.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pageport' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
