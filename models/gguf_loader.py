"""GGUF files: config, tokenizer and dequantized weights under Hugging Face names.

The `gguf` package reads the file (`GGUFReader`, `gguf.quants.dequantize`); transformers turns
its metadata into a config and a tokenizer (`from_pretrained(folder, gguf_file=name)`). Both
parse every metadata field in Python (~3 s each for the default model, ~2.5 s for the reader),
and dequantizing takes ~1 s more, so the first load saves the config, the tokenizer, the tensor table and
the dequantized weights (float32 safetensors, a CRC-32 per tensor) under a cache folder keyed by the file's
path, size and mtime; later loads read those (the weights memory-mapped, each checked against its CRC; a bad
entry is rebuilt from the file). For the dense Llama-family types the config is kept as plain attributes
(`PlainConfig`), so a warm load imports nothing from transformers.

Cache folder: $PAGEPORT_CACHE_DIR, else $XDG_CACHE_HOME/pageport, else ~/.cache/pageport
(PAGEPORT_CACHE_DIR=off disables it). A cache that cannot be written is skipped with a warning.
Weights whose float32 form exceeds PAGEPORT_GGUF_WEIGHT_CACHE_GB (default 4) are not cached.
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

import zlib

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: MoE configs completed from the file's expert metadata; 3: weights, plain configs
_TENSORS_FILE = "gguf_tensors.json"
_WEIGHTS_FILE = "weights.safetensors"
# the weight cache's reads and writes, by this process (tests assert on them)
weight_cache_stats = {"hits": 0, "writes": 0, "rejected": 0}

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

    cache_dir: Optional[Path] = None  # the cache entry (None: no cache)
    tokenizer_dir: Optional[Path] = None  # the entry holds a tokenizer that was not loaded (open_gguf lazy_tokenizer)

    def load_tokenizer(self):
        if self.tokenizer is None and self.tokenizer_dir is not None:
            self.tokenizer = load_cached_tokenizer(self.tokenizer_dir)
        return self.tokenizer

    def weights(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """(HF name, float32 tensor) for every tensor, dequantized, as transformers names and means it (rope
        permutation undone, Gemma's norms back to w): from the cache entry when it holds them intact, else
        converted from the file (and written to the entry)."""
        done: set[str] = set()
        if self.cache_dir is not None and (self.cache_dir / _WEIGHTS_FILE).is_file():
            try:
                for name, w in _read_weights(self.cache_dir / _WEIGHTS_FILE):
                    done.add(name)
                    yield name, w
                weight_cache_stats["hits"] += 1
                return
            except _BadEntry as e:  # never trusted: what was not yet given comes from the file, and it is rewritten
                weight_cache_stats["rejected"] += 1
                logger.warning("rebuilding the cached GGUF weights in %s: %s", self.cache_dir, e)
                (self.cache_dir / _WEIGHTS_FILE).unlink(missing_ok=True)
        writer = _WeightWriter.open(self.cache_dir, self.tensors)
        try:
            for name, w in self._convert():
                if writer is not None:
                    writer.add(name, w)
                if name not in done:
                    yield name, w
            if writer is not None:
                writer.finish()
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    def _convert(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        import numpy as np
        import torch
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


class PlainConfig:
    """A model config as plain attributes: what transformers' config of the same file holds (its `to_dict()`).
    Used for the dense Llama-family types, whose model code only reads attributes: building it imports nothing
    from transformers (the import alone is ~1.5 s of a 2-core CPU's start-up)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
        if isinstance(values.get("id2label"), dict):  # JSON made its keys strings; transformers' are ints
            self.id2label = {int(k): v for k, v in values["id2label"].items()}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.__dict__))

    def get_text_config(self, *args, **kwargs):
        return self

    def __repr__(self) -> str:
        return f"PlainConfig({self.__dict__!r})"


_PLAIN_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _plain_config(hf_config) -> Optional[dict]:
    """The config as a plain dict when its type may use PlainConfig (a dense Llama-family model with plain RoPE,
    which pageport computes itself), else None."""
    if getattr(hf_config, "model_type", None) not in _PLAIN_TYPES or getattr(hf_config, "quantization_config", None):
        return None
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    if not getattr(hf_config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
        hf_config.architectures = [name] if name else []
    d = hf_config.to_dict()
    try:
        return json.loads(json.dumps(d))
    except (TypeError, ValueError):
        return None


_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_cached_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The tokenizer saved in a cache entry. The class it names is loaded directly when it is the tokenizers
    backend (what AutoTokenizer resolves it to too): AutoTokenizer would first import the config machinery, ~1 s."""
    try:
        named = json.loads((Path(folder) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        named = None
    if named in _FAST_CLASSES:
        import transformers

        cls = getattr(transformers, named, None) or transformers.PreTrainedTokenizerFast
        return cls.from_pretrained(folder, trust_remote_code=trust_remote_code)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def cached_tokenizer_dir(path: Path) -> Optional[Path]:
    """The cache entry holding the tokenizer of the GGUF file `path`, if it is complete (cheap: reads no tokenizer)."""
    cache = _cache_dir(Path(path).resolve())
    if cache is None or not (cache / _TENSORS_FILE).is_file() or not (cache / "tokenizer_config.json").is_file():
        return None
    return cache


class _BadEntry(Exception):
    pass


def _read_weights(file: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """The cached tensors in their order, each checked against its CRC-32 before it is given."""
    from safetensors import safe_open

    try:
        st = safe_open(str(file), framework="pt")
        meta = json.loads((st.metadata() or {})["pageport"])
        order, crcs = meta["order"], meta["crc32"]
        if meta.get("version") != CACHE_VERSION or sorted(order) != sorted(st.keys()):
            raise _BadEntry("the tensor list does not match")
    except _BadEntry:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged header or metadata
        raise _BadEntry(f"unreadable ({type(e).__name__}: {e})") from None
    for name, crc in zip(order, crcs):
        try:
            w = st.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - truncated data
            raise _BadEntry(f"{name}: {e}") from None
        if zlib.crc32(_bytes(w)) != crc:
            raise _BadEntry(f"{name}: CRC-32 mismatch")
        yield name, w


class _WeightWriter:
    """Streams converted tensors into a temporary data file; `finish` puts the safetensors header in front and
    moves the file into the entry in one rename (a reader never sees half a file)."""

    def __init__(self, cache: Path):
        self.cache = cache
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".weights-", suffix=".data")
        self.data_path = Path(tmp)
        self.data = os.fdopen(fd, "wb")
        self.header: dict = {}
        self.order: list[str] = []
        self.crcs: list[int] = []
        self.offset = 0

    @classmethod
    def open(cls, cache: Optional[Path], tensors: list[TensorInfo]) -> Optional["_WeightWriter"]:
        if cache is None or not (cache / _TENSORS_FILE).is_file():
            return None
        limit = float(os.environ.get("PAGEPORT_GGUF_WEIGHT_CACHE_GB", "4")) * (1 << 30)
        if _float32_bytes(tensors) > limit:
            logger.info("GGUF weights not cached: %.1f GiB as float32 is over PAGEPORT_GGUF_WEIGHT_CACHE_GB",
                        _float32_bytes(tensors) / (1 << 30))
            return None
        try:
            return cls(cache)
        except OSError as e:
            logger.warning("could not cache the GGUF weights under %s: %s", cache, e)
            return None

    _DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "int16": "I16", "int32": "I32",
               "int64": "I64", "float64": "F64", "uint8": "U8"}

    def add(self, name: str, w) -> None:
        data = _bytes(w)
        self.data.write(data)
        n = data.nbytes
        self.header[name] = {"dtype": self._DTYPES[str(w.dtype).removeprefix("torch.")], "shape": list(w.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        self.order.append(name)
        self.crcs.append(zlib.crc32(data))
        self.offset += n

    def finish(self) -> None:
        try:
            self.data.close()
            meta = {"version": CACHE_VERSION, "order": self.order, "crc32": self.crcs}
            header = json.dumps({"__metadata__": {"pageport": json.dumps(meta)}, **self.header}).encode()
            header += b" " * (-len(header) % 8)
            fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=".weights-", suffix=".safetensors")
            with os.fdopen(fd, "wb") as out, open(self.data_path, "rb") as src:
                out.write(len(header).to_bytes(8, "little"))
                out.write(header)
                shutil.copyfileobj(src, out, 16 << 20)
            os.replace(tmp, self.cache / _WEIGHTS_FILE)
            weight_cache_stats["writes"] += 1
        except OSError as e:
            logger.warning("could not cache the GGUF weights under %s: %s", self.cache, e)
        finally:
            self.data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self.data.close()
        self.data_path.unlink(missing_ok=True)


def _bytes(w):
    import torch

    return w.contiguous().reshape(-1).view(torch.uint8).numpy()


def _float32_bytes(tensors: list[TensorInfo]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    total = 0
    for t in tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
        total += t.n_bytes // size * block * 4
    return total


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
    from importlib.metadata import version  # not `import transformers`: that alone costs ~0.7 s

    st = path.stat()
    key = f"{CACHE_VERSION}|{version('transformers')}|{path}|{st.st_size}|{st.st_mtime_ns}"
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


def open_gguf(path: Path, tokenizer: bool = True, trust_remote_code: bool = False,
              lazy_tokenizer: bool = False) -> GGUFModel:
    """Config (+ tokenizer) and tensor table of a GGUF file, from the cache when it has them. `lazy_tokenizer`: a
    cached tokenizer is not loaded, only named (`tokenizer_dir`; `load_tokenizer()` loads it)."""
    path = Path(path).resolve()
    cache = _cache_dir(path)
    if cache is not None and (cache / _TENSORS_FILE).is_file():
        try:
            meta = json.loads((cache / _TENSORS_FILE).read_text())
            if meta.get("version") != CACHE_VERSION:
                raise ValueError(f"cache version {meta.get('version')}, not {CACHE_VERSION}")
            if meta.get("config") is not None:
                hf_config = PlainConfig(meta["config"])
            else:
                from transformers import AutoConfig

                hf_config = AutoConfig.from_pretrained(cache, trust_remote_code=trust_remote_code)
            tok, tok_dir = None, None
            if tokenizer:
                if meta.get("tokenizer", True):
                    if lazy_tokenizer:
                        tok_dir = cache
                    else:
                        tok = load_cached_tokenizer(cache, trust_remote_code)
                else:  # none cached: let transformers say why
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=trust_remote_code,
                                                        gguf_file=path.name)
            return GGUFModel(path, meta["arch"], [TensorInfo(**t) for t in meta["tensors"]], hf_config, tok, True,
                             cache, tok_dir)
        except Exception as e:  # a damaged or outdated cache entry: rebuild it
            logger.warning("ignoring the GGUF cache at %s: %s", cache, e)
            shutil.rmtree(cache, ignore_errors=True)

    from transformers import AutoConfig, AutoTokenizer

    arch, tensors, moe = _read_table(path)
    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    hf_config = _moe_config(arch, moe, AutoConfig.from_pretrained(path.parent, **kw))
    plain = _plain_config(hf_config)
    tok = None
    if tokenizer or cache is not None:  # the cache entry holds the tokenizer too, whether asked for now or not
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        except Exception:
            if tokenizer:
                raise
    if cache is not None and not _write_cache(cache, arch, tensors, hf_config, tok, plain):
        cache = None
    return GGUFModel(path, arch, tensors, PlainConfig(plain) if plain is not None else hf_config,
                     tok if tokenizer else None, False, cache)


def _write_cache(cache: Path, arch: str, tensors: list[TensorInfo], hf_config, tok, plain: Optional[dict]) -> bool:
    """Write the entry (without weights: `GGUFModel.weights` adds them); False when there is none afterwards."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        hf_config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        meta = {"version": CACHE_VERSION, "arch": arch, "tokenizer": tok is not None, "config": plain,
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
    return (cache / _TENSORS_FILE).is_file()
