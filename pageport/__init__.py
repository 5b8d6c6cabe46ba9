"""pageport: LLM inference and serving with paged attention on pluggable hardware platforms."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pageport")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "__version__"]


def __getattr__(name):
    # Lazy, so `import pageport` stays cheap for the CLI and for plugins.
    if name == "LLM":
        from pageport.core.llm import LLM
        return LLM
    if name == "SamplingParams":
        from pageport.core.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from pageport.core import outputs
        return getattr(outputs, name)
    if name == "EngineConfig":
        from pageport.core.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'pageport' has no attribute {name!r}")
