"""`from pageport.lora.request import LoRARequest`, where vLLM's scripts import it from."""
from pageport.core.lora import LoRARequest

__all__ = ["LoRARequest"]
