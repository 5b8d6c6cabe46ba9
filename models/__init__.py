"""Model architectures (the Llama family) and weight loading (safetensors, GGUF, dummy)."""
from pageport.models.default import default_model_path
from pageport.models.loader import LoadedModel, load_model
from pageport.models.registry import get_model_class, supported_architectures

__all__ = ["load_model", "LoadedModel", "get_model_class", "supported_architectures", "default_model_path"]
