"""`--speculative-config` / `LLM(speculative_config={...})` with vLLM's keys."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "draft_tensor_parallel_size", "quantization"}


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    @classmethod
    def parse(cls, value: Union[None, str, dict, "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """A JSON string or dict with vLLM's keys -> a checked config (None: no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        unknown = set(value) - _KEYS
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        d: dict[str, Any] = dict(value)
        method = d.get("method") or ("ngram" if d.get("model") in ("[ngram]", "ngram") else None)
        if method != "ngram":
            raise ValueError(f"speculative_config: method {method!r} is not supported; only 'ngram' "
                             "(prompt lookup) is implemented")
        if d.get("model") not in (None, "[ngram]", "ngram"):
            raise ValueError("speculative_config: the ngram method takes no draft model")
        if d.get("draft_tensor_parallel_size") not in (None, 1) or d.get("quantization") is not None:
            raise ValueError("speculative_config: draft_tensor_parallel_size and quantization apply to draft "
                             "models, which are not supported")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        k = d["num_speculative_tokens"]
        lmax = d.get("prompt_lookup_max", d.get("prompt_lookup_min", 4))
        lmin = d.get("prompt_lookup_min", min(2, lmax) if isinstance(lmax, int) else 2)
        for name, v in (("num_speculative_tokens", k), ("prompt_lookup_max", lmax), ("prompt_lookup_min", lmin)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {v!r}")
        if lmin > lmax:
            raise ValueError(f"speculative_config: prompt_lookup_min ({lmin}) > prompt_lookup_max ({lmax})")
        return cls("ngram", k, lmax, lmin)
