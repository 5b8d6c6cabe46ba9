"""GGUF files: config, tokenizer and dequantized weights under Hugging Face names.

The `gguf` package reads the file (`GGUFReader`, `gguf.quants.dequantize`); transformers turns
its metadata into a config and a tokenizer (`from_pretrained(folder, gguf_file=name)`). Both
parse every metadata field in Python (~3 s each for the default model, ~2.5 s for the reader),
so the first load saves the config, the tokenizer and the tensor table under a cache folder
keyed by the file's path, size and mtime; later loads read those and memory-map the file.

Cache folder: $PAGEPORT_CACHE_DIR, else $XDG_CACHE_HOME/pageport, else ~/.cache/pageport
(PAGEPORT_CACHE_DIR=off disables it). A cache that cannot be written is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: MoE configs completed from the file's expert metadata
_TENSORS_FILE = "gguf_tensors.json"

# llama.cpp tensor names -> Hugging Face names (Llama-family layout)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          # MoE (Mixtral under arch "llama", qwen2moe, qwen3moe): the router, all experts of a layer stacked in one
          # tensor [experts, rows, cols] (split per expert when read), Qwen2-MoE's shared expert and its gate
          "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
          "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
          "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
          "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# Gemma 2/3: four norms a layer; llama.cpp's ffn_norm is the pre-feedforward norm there
_GEMMA_BLOCK = {**_BLOCK, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA_ARCHS = ("gemma2", "gemma3")  # llama.cpp stores their norms as 1 + w (transformers' w = stored - 1)
_SKIP = {"rope_freqs"}  # llama3 rope factors: the config's rope parameters cover them
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_PERMUTED_ARCHS = ("llama",)  # convert_hf_to_gguf.py permutes q/k only for these (as transformers assumes)


def hf_name(gguf_name: str, arch: str = "llama") -> Optional[str]:
    """The Hugging Face name of a llama.cpp tensor; None for tensors to skip."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, kind, suffix = m.groups()
        block = _GEMMA_BLOCK if arch in _GEMMA_ARCHS else _BLOCK
        return f"model.layers.{layer}.{block[kind]}.{suffix}" if kind in block else gguf_name
    base, _, suffix = gguf_name.rpartition(".")
    if base in _SKIP:
        return None
    return f"{_TOP[base]}.{suffix}" if base in _TOP else gguf_name


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of attn_q / attn_k (weight [rows, cols] or bias [rows])."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class TensorInfo:
    name: str
    qtype: int  # gguf.GGMLQuantizationType
    dtype: str  # numpy dtype of the raw data
    shape: list[int]  # of the raw data (rows first)
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFModel:
    path: Path
    arch: str
    tensors: list[TensorInfo]
    hf_config: Any
    tokenizer: Any  # None when not asked for
    cached: bool  # config/tokenizer/tensor table came from the cache

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every tensor, dequantized, as transformers names and means it (rope
        permutation undone, Gemma's norms back to w)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        permute = self.arch in _ROPE_PERMUTED_ARCHS
        n_q, n_kv = self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads
        for t in self.tensors:
            name = hf_name(t.name, self.arch)
            if name is None:
                continue
            raw = mm[t.offset:t.offset + t.n_bytes].view(np.dtype(t.dtype)).reshape(t.shape)
            w = dequantize(raw, GGMLQuantizationType(t.qtype))
            if permute and ".attn_q." in t.name:
                w = unpermute_rope(w, n_q)
            elif permute and ".attn_k." in t.name:
                w = unpermute_rope(w, n_kv)
            elif self.arch in _GEMMA_ARCHS and name.endswith("norm.weight"):
                w = w - 1.0
            elif name.endswith("shared_expert_gate.weight"):
                w = w.reshape(1, -1)  # llama.cpp keeps it 1-D ([hidden]); the model's is a [1, hidden] linear
            if not w.flags.writeable or not w.flags.c_contiguous:
                w = np.array(w, dtype=np.float32, order="C")
            if t.name.endswith("_exps.weight"):  # [experts, rows, cols] -> one tensor per expert
                prefix, _, part = name.removesuffix(".weight").rpartition(".")
                for e in range(w.shape[0]):
                    yield f"{prefix}.{e}.{part}.weight", torch.from_numpy(w[e])
                continue
            yield name, torch.from_numpy(w)


def cache_root() -> Optional[Path]:
    env = os.environ.get("PAGEPORT_CACHE_DIR")
    if env and env.lower() in ("off", "0", "none"):
        return None
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pageport"
    return base.expanduser() / "gguf"


def _cache_dir(path: Path) -> Optional[Path]:
    root = cache_root()
    if root is None:
        return None
    import transformers

    st = path.stat()
    key = f"{CACHE_VERSION}|{transformers.__version__}|{path}|{st.st_size}|{st.st_mtime_ns}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _read_table(path: Path) -> tuple[str, list[TensorInfo], dict]:
    """(architecture, tensor table, the MoE metadata `{arch}.expert_*` that transformers' config leaves out)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else "llama"
    tensors = [TensorInfo(t.name, int(t.tensor_type), t.data.dtype.str, list(t.data.shape), int(t.data_offset),
                          int(t.n_bytes)) for t in reader.tensors]
    moe = {k.removeprefix(f"{arch}."): f.contents() for k, f in reader.fields.items()
           if k.startswith(f"{arch}.expert_")}
    return arch, tensors, moe


def _moe_config(arch: str, moe: dict, hf_config):
    """Complete transformers' config of a MoE GGUF from the file's expert metadata. transformers reads a Mixtral
    file (llama.cpp writes it as arch "llama" with an expert count) as a dense Llama, and for qwen2moe / qwen3moe
    it takes the expert and shared-expert sizes from its config defaults instead of the file."""
    if not moe.get("expert_count"):
        return hf_config
    if arch == "llama":
        from transformers import MixtralConfig

        d = {k: v for k, v in hf_config.to_dict().items()
             if k not in ("model_type", "architectures", "transformers_version")}
        d.update(num_local_experts=moe["expert_count"], num_experts_per_tok=moe["expert_used_count"])
        cfg = MixtralConfig(**d)
        cfg.architectures = ["MixtralForCausalLM"]
        return cfg
    if "expert_feed_forward_length" in moe:
        hf_config.moe_intermediate_size = moe["expert_feed_forward_length"]
    if "expert_shared_feed_forward_length" in moe:
        hf_config.shared_expert_intermediate_size = moe["expert_shared_feed_forward_length"]
    return hf_config


def open_gguf(path: Path, tokenizer: bool = True, trust_remote_code: bool = False) -> GGUFModel:
    """Config (+ tokenizer) and tensor table of a GGUF file, from the cache when it has them."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path).resolve()
    cache = _cache_dir(path)
    if cache is not None and (cache / _TENSORS_FILE).is_file():
        try:
            meta = json.loads((cache / _TENSORS_FILE).read_text())
            hf_config = AutoConfig.from_pretrained(cache, trust_remote_code=trust_remote_code)
            tok = None
            if tokenizer:
                src = cache if meta.get("tokenizer", True) else path.parent  # none cached: let transformers say why
                kw = {} if src is cache else {"gguf_file": path.name}
                tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
            return GGUFModel(path, meta["arch"], [TensorInfo(**t) for t in meta["tensors"]], hf_config, tok, True)
        except Exception as e:  # a damaged cache entry: rebuild it
            logger.warning("ignoring the GGUF cache at %s: %s", cache, e)
            shutil.rmtree(cache, ignore_errors=True)

    arch, tensors, moe = _read_table(path)
    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    hf_config = _moe_config(arch, moe, AutoConfig.from_pretrained(path.parent, **kw))
    tok = None
    if tokenizer or cache is not None:  # the cache entry holds the tokenizer too, whether asked for now or not
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        except Exception:
            if tokenizer:
                raise
    if cache is not None:
        _write_cache(cache, arch, tensors, hf_config, tok)
    return GGUFModel(path, arch, tensors, hf_config, tok if tokenizer else None, False)


def _write_cache(cache: Path, arch: str, tensors: list[TensorInfo], hf_config, tok) -> None:
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        hf_config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        meta = {"version": CACHE_VERSION, "arch": arch, "tokenizer": tok is not None,
                "tensors": [t.__dict__ for t in tensors]}
        (tmp / _TENSORS_FILE).write_text(json.dumps(meta))
        os.replace(tmp, cache)  # atomic; fails if another process got there first (fine)
        tmp = None
    except OSError as e:
        if not (cache / _TENSORS_FILE).is_file():  # not just a lost race with another process
            logger.warning("could not cache the GGUF conversion under %s: %s", cache, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
