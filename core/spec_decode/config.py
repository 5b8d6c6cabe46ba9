"""`--speculative-config` / `LLM(speculative_config={...})` with vLLM's keys."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "draft_tensor_parallel_size", "quantization"}


@dataclass
class SpeculativeConfig:
    method: str = "ngram"  # ngram (prompt lookup) | draft_model (a smaller model, the same vocabulary) | eagle | eagle3
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: Optional[str] = None  # draft_model, eagle, eagle3: the checkpoint (draft_model: the target with `quantization` too)
    quantization: Optional[str] = None  # draft_model: its linears' format, as the engine's `quantization`

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
        model = d.get("model")
        method = d.get("method") or ("ngram" if model in (None, "[ngram]", "ngram") else "draft_model")
        if method in ("draft", "draft_model"):
            method = "draft_model"
        elif method not in ("ngram", "eagle", "eagle3"):
            raise ValueError(f"speculative_config: method {method!r} is not supported; choose 'ngram' (prompt "
                             "lookup), 'draft_model', 'eagle' or 'eagle3' (MTP heads are not implemented)")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        k = d["num_speculative_tokens"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer >= 1, got {k!r}")
        if d.get("draft_tensor_parallel_size") not in (None, 1):
            raise ValueError("speculative_config: draft_tensor_parallel_size must be 1 (the draft runs on one "
                             "device beside the target)")
        if method in ("eagle", "eagle3"):
            if not isinstance(model, str) or not model:
                raise ValueError(f"speculative_config: method {method!r} needs the EAGLE head's checkpoint in 'model'")
            if d.get("quantization") is not None:
                raise ValueError("speculative_config: an EAGLE head takes no quantization")
            return cls(method, k, model=model)
        if method == "draft_model":
            if not isinstance(model, str) or not model or model in ("[ngram]", "ngram"):
                raise ValueError("speculative_config: method 'draft_model' needs a draft checkpoint in 'model'")
            q = d.get("quantization")
            if q is not None:
                from pageport.models.quantization import QUANTIZATIONS
                if q not in QUANTIZATIONS:
                    raise ValueError(f"speculative_config: unknown quantization {q!r}; choose one of "
                                     f"{', '.join(QUANTIZATIONS)}")
            return cls("draft_model", k, model=model, quantization=q)
        if model not in (None, "[ngram]", "ngram") or d.get("quantization") is not None:
            raise ValueError("speculative_config: the ngram method takes no draft model nor quantization")
        lmax = d.get("prompt_lookup_max", d.get("prompt_lookup_min", 4))
        lmin = d.get("prompt_lookup_min", min(2, lmax) if isinstance(lmax, int) else 2)
        for name, v in (("prompt_lookup_max", lmax), ("prompt_lookup_min", lmin)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {v!r}")
        if lmin > lmax:
            raise ValueError(f"speculative_config: prompt_lookup_min ({lmin}) > prompt_lookup_max ({lmax})")
        return cls("ngram", k, lmax, lmin)
