"""Engine options: one definition feeds `LLM(**kwargs)`, the CLI and the server flags."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch

# dtype names -> torch attribute names: torch is imported only when a dtype is resolved, so that the CLI can
# parse its flags and start the engine core before it pays for `import torch` (~1 s on a 2-core CPU)
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}

_KV_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: Optional[str] = _opt(None, "HF directory, .gguf file or config.json; default: SmolLM2-135M-Instruct",
                                positional=True)
    tokenizer: Optional[str] = _opt(None, "tokenizer directory (default: from the model)")
    device: str = _opt("auto", "platform name, or auto (also PAGEPORT_DEVICE); `pageport platforms` lists them")
    dtype: Union[str, torch.dtype] = _opt("auto", "auto | float32 | bfloat16 | float16")
    load_format: str = _opt("auto", "auto | safetensors | gguf | dummy (random weights from the config)",
                            choices=("auto", "safetensors", "gguf", "dummy"))
    max_model_len: Optional[int] = _opt(None, "context length (default: the model's)")
    block_size: int = _opt(16, "tokens per KV-cache block")
    max_num_seqs: int = _opt(256, "most requests in one step")
    max_num_batched_tokens: Optional[int] = _opt(None, "token budget of one step (default: the platform's, "
                                                       "2048 on the CPU, 8192 on GPUs; at least max_model_len "
                                                       "without chunked prefill)")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of shared prompt prefixes")
    enable_chunked_prefill: bool = _opt(True, "split long prompts across steps")
    seed: int = _opt(0, "random seed")
    gpu_memory_utilization: float = _opt(0.9, "fraction of device memory the engine may use")
    kv_cache_memory_bytes: Optional[int] = _opt(None, "KV-cache size in bytes (CPU default 4 GiB)")
    num_gpu_blocks_override: Optional[int] = _opt(None, "exact number of KV-cache blocks")
    quantization: Optional[str] = _opt(None, "quantized linears: the checkpoint's format is detected from its "
                                             "config (compressed-tensors, fp8, awq, gptq; naming it must agree); "
                                             "on a dense checkpoint fp8 | w8a8 | w4a16 quantize while loading; "
                                             "gguf: a GGUF file's Q4_0/Q4_1/Q8_0 linears stay quantized; "
                                             "int4 | int8: the CPU's weight-only matmuls for small batches",
                                       choices=("compressed-tensors", "fp8", "awq", "gptq", "w8a8", "w4a16",
                                                "gguf", "int4", "int8"))
    kv_cache_dtype: str = _opt("auto", "KV-cache element type: auto (the model's dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | "
                                       "fp8_e5m2: half the bytes per token (scale 1.0: values past the format's "
                                       "range saturate)", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"))
    enforce_eager: bool = _opt(False, "never capture graphs")
    async_scheduling: Optional[bool] = _opt(None, "prepare step N+1 while the device runs step N (default: on "
                                                  "where the device runs asynchronously to the host)")
    compile: bool = _opt(False, "torch.compile the dense parts of each layer where the platform does (CPU: fused "
                                "C++ kernels from inductor; the first start compiles for ~30-60 s, cached after)")
    num_threads: Optional[int] = _opt(None, "CPU threads (default: OMP_NUM_THREADS or all cores)")
    tensor_parallel_size: int = _opt(1, "devices to shard the model over (one process each; on the CPU, gloo "
                                        "between processes)")
    pipeline_parallel_size: int = _opt(1, "stages to split the model's layers over (one process each, contiguous "
                                          "layers; activations passed point to point)")
    data_parallel_size: int = _opt(1, "engine cores behind one front end, each a full copy of the model with its "
                                      "own devices (tensor_parallel_size each) and KV cache; requests go to the "
                                      "least loaded core, or to one that holds their prompt's prefix")
    # this core's place among them: set by the front end for each core it starts, never by a user
    data_parallel_rank: int = _opt(0, "", cli=False)
    distributed_executor_backend: Optional[str] = _opt(None, "uni (the model in the engine core process) | mp "
                                                             "(a worker process per further rank) | ray; default: "
                                                             "mp when tensor x pipeline ranks > 1, else uni",
                                                       choices=("uni", "mp", "ray"))
    scheduling_policy: str = _opt("fcfs", "fcfs | priority", choices=("fcfs", "priority"))
    max_logprobs: int = _opt(20, "most logprobs a request may ask for (-1: no limit, needed for logprobs=-1)")
    logits_processors: Optional[list] = _opt(None, "custom logits-processor classes (vLLM's LogitsProcessor "
                                                   "interface) as module:Class; configured per request through "
                                                   "SamplingParams.extra_args", nargs="+")
    trust_remote_code: bool = _opt(False, "allow custom code from the model directory")
    speculative_config: Optional[Union[str, dict]] = _opt(None, "speculative decoding, JSON with vLLM's keys: "
                                                                "{\"method\": \"ngram\", \"num_speculative_tokens\": 3, "
                                                                "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} or a "
                                                                "draft model: {\"model\": DIR, \"num_speculative_tokens\": "
                                                                "4, \"quantization\": \"int4\"} or an EAGLE head: "
                                                                "{\"method\": \"eagle\" (or \"eagle3\"), \"model\": DIR, "
                                                                "\"num_speculative_tokens\": 3}")
    limit_mm_per_prompt: Optional[Union[str, dict]] = _opt(None, "vision models: the most images one prompt may "
                                                                 "carry, JSON as vLLM's: {\"image\": 2} (default: "
                                                                 "no limit)")
    # multi-LoRA: core/lora.py, models/lora/
    enable_lora: bool = _opt(False, "serve PEFT LoRA adapters of this model (LLM.generate(lora_request=...), "
                                    "--lora-modules)")
    max_loras: int = _opt(1, "adapters resident on the device at once (and in one step)")
    max_lora_rank: int = _opt(16, "largest adapter rank accepted")
    max_cpu_loras: Optional[int] = _opt(None, "adapters kept read on the host (default: max_loras)")
    # pooling models (embeddings, classification, scoring): core/pooling.py
    runner: str = _opt("auto", "generate | pooling (embeddings, classification, scores); auto: pooling for encoder "
                               "architectures (BERT, RoBERTa, XLM-R) and --convert embed|classify|reward",
                       choices=("auto", "generate", "pooling"))
    convert: str = _opt("auto", "what a pooling model outputs: embed | classify | reward (auto: the architecture's "
                                "own; a decoder becomes an embedder)",
                        choices=("auto", "none", "embed", "classify", "reward"))
    task: Optional[str] = _opt(None, "older spelling of --runner/--convert: embed (= --runner pooling --convert "
                                     "embed), classify, score, reward, generate")
    pooler_config: Optional[str] = _opt(None, "JSON overriding the pooler: {\"pooling_type\": \"MEAN|CLS|LAST|ALL\", "
                                              "\"normalize\": bool, \"is_matryoshka\": bool, "
                                              "\"matryoshka_dimensions\": [..]}")

    def __post_init__(self):
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size and max_num_seqs must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose auto, {', '.join(_KV_DTYPES)}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.data_parallel_size < 1 or not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.distributed_executor_backend is None:  # as vLLM: one process unless the model is split
            self.distributed_executor_backend = "mp" if self.world_size > 1 else "uni"
        if self.distributed_executor_backend not in ("uni", "mp", "ray"):
            raise ValueError(f"unknown distributed_executor_backend {self.distributed_executor_backend!r}; "
                             f"choose uni, mp or ray")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one process: tensor_parallel_size "
                             f"{self.tensor_parallel_size} x pipeline_parallel_size {self.pipeline_parallel_size} "
                             "needs 'mp' (or 'ray')")
        if self.enable_lora:
            if self.max_loras < 1 or self.max_lora_rank < 1:
                raise ValueError("max_loras and max_lora_rank must be >= 1")
            if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
            if self.world_size > 1:  # the LoRA layers wrap whole projections, not shards (yet)
                raise ValueError("enable_lora does not work with tensor or pipeline parallelism yet")
        if self.speculative_config is not None:  # checked here; kept as a dict (it crosses to the core process)
            from pageport.core.spec_decode.config import SpeculativeConfig
            self.speculative_config = dataclasses.asdict(SpeculativeConfig.parse(self.speculative_config))
        if self.limit_mm_per_prompt is not None:  # checked here, kept as a plain dict
            from pageport.models.multimodal.inputs import parse_mm_limits
            self.limit_mm_per_prompt = parse_mm_limits(self.limit_mm_per_prompt)
        if self.logits_processors:  # checked here, and turned into names the engine core's process can load
            from pageport.core.logits_processors import processor_refs
            self.logits_processors = processor_refs(self.logits_processors)
        if self.task is not None:
            from pageport.core.pooling import TASK_ALIASES
            if self.task not in TASK_ALIASES:
                raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_ALIASES)}")
            self.runner = "generate" if self.task == "generate" else "pooling"
            if self.task != "generate" and self.convert == "auto":
                self.convert = TASK_ALIASES[self.task]
            self.task = None  # said once, in runner/convert
        if self.runner == "generate" and self.convert not in ("auto", "none"):
            raise ValueError(f"convert={self.convert!r} makes a pooling model: use runner='pooling' (or 'auto')")

    @property
    def world_size(self) -> int:
        """Processes that one engine core's model runs in: tensor x pipeline ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolve_dtype(self, supported: tuple[torch.dtype, ...]) -> None:
        """Turn `dtype` into a torch.dtype; auto takes the platform's first supported dtype."""
        import torch

        if isinstance(self.dtype, torch.dtype):
            return
        if self.dtype == "auto":
            self.dtype = supported[0]
        elif self.dtype in _DTYPES:
            self.dtype = getattr(torch, _DTYPES[self.dtype])
        else:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto or one of {', '.join(_DTYPES)}")

    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type (call after `resolve_dtype`)."""
        if self.kv_cache_dtype == "auto":
            return self.dtype
        if self.kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose auto, {', '.join(_KV_DTYPES)}")
        import torch

        return getattr(torch, _KV_DTYPES[self.kv_cache_dtype])

    # CLI ---------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            help_ = meta.pop("help")
            if not meta.pop("cli", True):
                continue
            if meta.pop("positional", False):
                if model_positional:
                    parser.add_argument(f.name, nargs="?", default=f.default, help=help_)
                else:
                    parser.add_argument("--" + f.name, "-m", default=f.default, help=help_)
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool, "Optional[bool]"):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            else:
                kind = _cli_type(f.type)
                parser.add_argument(flag, type=kind, default=f.default, help=help_, **meta)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _cli_type(annotation: Any):
    text = str(annotation)
    if "int" in text:
        return int
    if "float" in text and "dtype" not in text:
        return float
    return str
