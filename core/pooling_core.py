"""The engine core of a pooling model (`runner="pooling"`): the same scheduler, KV-cache manager, process and
messages as generation, with a runner that pools instead of sampling.

Every request is prefill-only: its whole prompt runs in one step (chunked prefill and prefix caching are off, the
token budget is at least max_model_len) and the step's output is the pooled vector, after which the request is
finished and its blocks return. Encoder models (BERT, RoBERTa) attend bidirectionally and keep no KV cache: the
block manager only meters the step. Decoder models (`--convert embed|classify|reward`) run their usual paged
attention over a cache sized for one step.

`make_engine_core(config)` decides the runner (`resolve_runner`) and builds this core or the generation one.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pageport.core.config import EngineConfig
from pageport.core.engine_core import CoreOutput, CoreRequest, EngineCore
from pageport.core.executor import UniExecutor, place_rank
from pageport.core.kv_cache import KVCacheManager
from pageport.core.pooling import (PoolerConfig, PoolingParams, check_dimensions, classification_activation,
                                   finish_embedding, load_dense, pool, resolve_pooler_config,
                                   sentence_transformers_max_seq_length, tensor_to_bytes)
from pageport.core.request import Request, RequestStatus
from pageport.core.sampling_params import SamplingParams
from pageport.core.scheduler import Scheduler, ScheduledRequest
from pageport.platforms import AttentionMetadata, resolve_platform

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 8192  # tokens per pooling step, unless max_num_batched_tokens says otherwise

# the tasks each kind of pooling model serves; the first is its default
MODEL_TASKS = {"embed": ("embed", "token_embed"),
               "classify": ("classify", "score", "token_classify"),
               "reward": ("token_classify", "classify")}


def _architectures(config: EngineConfig) -> list[str]:
    """The model's architectures from its config.json, read without loading anything (GGUF files: none)."""
    from pageport.models.loader import resolve_model_path

    path = resolve_model_path(config.model)
    cfg = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else None
    if cfg is None or not cfg.is_file():
        return []
    return list(json.loads(cfg.read_text()).get("architectures") or [])


def resolve_runner(config: EngineConfig) -> None:
    """Settle config.runner (generate | pooling) and, for pooling, config.convert (embed | classify | reward)."""
    from pageport.models.bert import ENCODER_ARCHITECTURES

    archs = _architectures(config) if config.runner != "generate" or config.model else []
    encoder = next((a for a in archs if a in ENCODER_ARCHITECTURES), None)
    seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    if config.runner == "auto":
        config.runner = "pooling" if encoder or seq_cls or config.convert not in ("auto", "none") else "generate"
    if config.runner == "generate":
        if encoder:
            raise ValueError(f"{encoder} is an encoder model: it embeds, classifies and scores but does not "
                             f"generate (runner='pooling')")
        return
    if config.convert in ("auto", "none"):
        config.convert = "classify" if seq_cls else "embed"
    if encoder and config.convert == "classify" and not seq_cls:
        raise ValueError(f"{encoder} has no classification head: convert='classify' needs a "
                         f"*ForSequenceClassification checkpoint")
    if encoder and config.convert == "reward":
        raise ValueError(f"convert='reward' is for decoder models; {encoder} is an encoder")


def make_engine_core(config: EngineConfig) -> EngineCore:
    resolve_runner(config)
    if config.runner == "pooling" and config.world_size > 1:
        raise ValueError("tensor and pipeline parallelism are not supported for pooling models yet")
    return PoolingEngineCore(config) if config.runner == "pooling" else EngineCore(config)


class PoolingRequest(Request):
    """A prefill-only request: its output is `pooling_params`' vector, never a token."""

    def __init__(self, r: CoreRequest, pooling_params: PoolingParams):
        super().__init__(r.request_id, r.prompt_token_ids, SamplingParams(max_tokens=1), None, None, r.priority,
                         r.arrival_time or time.monotonic(), None, r.owner)
        self.pooling_params = pooling_params


class PoolingModelRunner:
    """Runs a step's whole prompts through the model and pools each one's hidden states."""

    def __init__(self, config: EngineConfig, platform, model: torch.nn.Module, pooler: PoolerConfig):
        self.config = config
        self.platform = platform
        self.model = model
        self.pooler = pooler
        self.device = platform.device
        self.block_size = config.block_size
        self.encoder = bool(getattr(model, "is_encoder", False))
        self.dense = [load_dense(d, self.device) for d in pooler.dense]  # projections of the pooled embedding
        self.graphs = None
        self.kv_caches: list[torch.Tensor] = []

    @property
    def embedding_size(self) -> int:
        """An embedding's length: the model's hidden size, or the last Dense projection's."""
        return self.dense[-1][0].out_features if self.dense else self.model.hidden_size

    def num_blocks(self) -> int:
        """Enough blocks for the fullest step (its requests all finish with it): nothing is ever preempted."""
        c = self.config
        return -(-c.max_num_batched_tokens // c.block_size) + c.max_num_seqs + 2

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if self.encoder:
            return  # bidirectional attention over the step's own tokens: nothing to keep
        m = self.model
        shape = m.attn_backend.kv_cache_shape(num_blocks, self.block_size, m.num_kv_heads, m.head_size)
        dtype = self.config.kv_cache_torch_dtype()
        if self.device.type == "cpu":  # calloc: pages cost nothing until a step touches them
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.kv_caches = [torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
                              for _ in range(m.num_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(m.num_layers)]

    def release(self, request_id: str) -> None:
        pass  # no per-request rows are kept

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest], kv: KVCacheManager) -> list[torch.Tensor]:
        """One float32 tensor per scheduled request: its pooled output."""
        dev, bs = self.device, self.block_size
        ids, positions, seq_lens, types, slots, tables = [], [], [], [], [], []
        for s in scheduled:
            r = s.request
            n = r.num_prompt_tokens
            if r.num_computed_tokens != 0 or s.num_tokens != n:
                raise RuntimeError(f"a pooling request must run its whole prompt in one step "
                                   f"({s.num_tokens} of {n} tokens scheduled)")
            ids += r.prompt_token_ids
            positions.append(np.arange(n))
            seq_lens.append(n)
            tt = r.pooling_params.token_type_ids
            types.append(np.asarray(tt, dtype=np.int64) if tt is not None else np.zeros(n, dtype=np.int64))
            if not self.encoder:
                blocks = [b.block_id for b in kv.req_blocks[r.request_id]]
                p = np.arange(n)
                slots.append(np.asarray(blocks, dtype=np.int64)[p // bs] * bs + p % bs)
                tables.append(blocks)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.from_numpy(np.concatenate(positions)).to(dev)
        if self.encoder:
            tt = torch.from_numpy(np.concatenate(types)).to(dev)
            hidden = self.model(input_ids, pos, tt, seq_lens)
        else:
            md = self._metadata(seq_lens, tables, np.concatenate(slots))
            hidden = self.model(input_ids, pos, self.kv_caches, self.model.attn_backend.build_metadata(md))
        return self._pool(hidden, scheduled, seq_lens)

    def _metadata(self, seq_lens: list[int], tables: list[list[int]], slots: np.ndarray) -> AttentionMetadata:
        dev = self.device
        qsl = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
        table = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        return AttentionMetadata(
            num_actual_tokens=int(qsl[-1]), query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_table=torch.from_numpy(table).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev), max_query_len=max(seq_lens), max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=list(seq_lens), block_size=self.block_size)

    def _pool(self, hidden: torch.Tensor, scheduled: list[ScheduledRequest], seq_lens: list[int]) -> list:
        pooler, model = self.pooler, self.model
        starts = np.concatenate([[0], np.cumsum(seq_lens)])
        results: list[Optional[torch.Tensor]] = [None] * len(scheduled)
        to_classify = []  # (result index, pooled hidden [H] or token states [n, H])
        for i, s in enumerate(scheduled):
            params = s.request.pooling_params
            h = hidden[starts[i]:starts[i + 1]]
            if params.task == "embed":
                vec = pool(h, pooler.pooling_type)
                for dense in self.dense:
                    vec = dense(vec.float())
                results[i] = finish_embedding(vec, params, pooler)
            elif params.task == "token_embed":
                results[i] = finish_embedding(h.float(), params, pooler)
            elif params.task == "token_classify":
                to_classify.append((i, h))
            else:  # classify, score: the head reads the pooled state (BERT: [CLS]; decoders: the last token)
                which = "CLS" if self.encoder else ("LAST" if pooler.pooling_type == "ALL" else pooler.pooling_type)
                to_classify.append((i, pool(h, which)))
        if to_classify:
            single = [x for _, x in to_classify if x.dim() == 1]
            logits = iter(model.classify(torch.stack(single).to(hidden.dtype)).split(1)) if single else iter(())
            for i, x in to_classify:
                params = scheduled[i].request.pooling_params
                out = model.classify(x.to(hidden.dtype)) if x.dim() == 2 else next(logits)[0]
                results[i] = classification_activation(out, params)
        return results


class PoolingEngineCore(EngineCore):
    """EngineCore for pooling models: same messages, scheduler and KV manager; steps pool instead of sampling."""

    def __init__(self, config: EngineConfig):  # noqa: D107 - the generation core's start-up, minus sampling
        t0 = time.perf_counter()
        from pageport.models import load_model
        from pageport.models.adapters import as_pooling_model
        from pageport.models.loader import resolve_model_path

        self.config = config
        self.platform = resolve_platform(config.device)
        config.resolve_dtype(self.platform.supported_dtypes)
        self.platform.check_config(config)
        place_rank(config, self.platform)
        self.platform.seed(config.seed)
        path = resolve_model_path(config.model)
        folder = path if path.is_dir() else path.parent
        if config.max_model_len is None:  # sentence-transformers' own limit, as vLLM reads it
            config.max_model_len = sentence_transformers_max_seq_length(folder)
        loaded = load_model(config, self.platform, adapt=lambda cls, hf: as_pooling_model(cls, config.convert, hf))
        self.loaded = loaded
        model = loaded.model
        # prefill-only: every prompt in one step, nothing cached across requests
        config.enable_chunked_prefill = False
        config.enable_prefix_caching = False
        config.async_scheduling = False
        if config.max_num_batched_tokens is None:
            config.max_num_batched_tokens = max(DEFAULT_TOKEN_BUDGET, config.max_model_len)
        elif config.max_num_batched_tokens < config.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least max_model_len "
                             f"({config.max_model_len}): a pooling model runs each prompt in one step")
        self.pooler = resolve_pooler_config(loaded.hf_config, folder, model.default_pooling_type,
                                            config.pooler_config)
        self.tasks = MODEL_TASKS[config.convert]
        if getattr(model, "num_labels", 0) == 0:
            self.tasks = tuple(t for t in self.tasks if t not in ("classify", "score", "token_classify"))
        if not self.tasks:
            raise ValueError(f"convert={config.convert!r}: this model has no classification head")
        self.runner = PoolingModelRunner(config, self.platform, model, self.pooler)
        self.executor = UniExecutor(config, self.platform, (loaded, self.runner))  # the core's release/shutdown
        num_blocks = self.runner.num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, False)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, False, config.scheduling_policy)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = False
        self._init_loop_state(config)
        logger.info("%s on %s: pooling runner (%s, %s pooling%s, tasks %s), %d tokens per step; start-up %.2f s",
                    loaded.source, self.platform.name, "encoder" if self.runner.encoder else "decoder",
                    self.pooler.pooling_type, ", normalized" if self.pooler.normalize else "", ", ".join(self.tasks),
                    config.max_num_batched_tokens, time.perf_counter() - t0)

    def info(self) -> dict:
        hf = self.loaded.hf_config
        labels = getattr(hf, "id2label", None) or {}
        num_labels = getattr(self.runner.model, "num_labels", 0)
        return {"config": self.config, "tokenizer": self.loaded.tokenizer, "hf_config": hf,
                "model_source": self.loaded.source, "vocab_size": hf.vocab_size, "eos_token_id": None,
                "platform": self.platform.name, "attention": "bidirectional (torch SDPA)" if self.runner.encoder
                else self.runner.model.attn_backend.name, "graphs": False,
                "pooling": {"tasks": list(self.tasks), "pooler": self.pooler.to_dict(),
                            "embedding_size": self.runner.embedding_size, "num_labels": num_labels,
                            "id2label": {int(k): v for k, v in labels.items()} if num_labels else {},
                            "encoder": self.runner.encoder}}

    def add_request(self, r: CoreRequest) -> None:
        try:
            params = pickle.loads(r.params)
            if not isinstance(params, PoolingParams):
                raise ValueError("this is a pooling model: it embeds, classifies and scores, it does not generate")
            if params.task is None:
                params = params.clone(task=self.tasks[0])
            if params.task not in self.tasks:
                raise ValueError(f"task {params.task!r} is not served by this model (it serves "
                                 f"{', '.join(self.tasks)})")
            check_dimensions(params.dimensions, self.pooler, self.runner.embedding_size)
            if params.token_type_ids is not None and len(params.token_type_ids) != len(r.prompt_token_ids):
                raise ValueError("token_type_ids must have one entry per prompt token")
            if not 0 < len(r.prompt_token_ids) <= self.config.max_model_len:
                raise ValueError(f"the prompt has {len(r.prompt_token_ids)} tokens; this model takes 1 to "
                                 f"{self.config.max_model_len}")
            req = PoolingRequest(r, params)
        except Exception as e:  # noqa: BLE001 - this request's own fault
            self._early.append(CoreOutput(r.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            return
        if r.request_id in self.requests:
            self._early.append(CoreOutput(r.request_id, finish_reason="error", error="duplicate request id"))
            return
        self.requests[r.request_id] = req
        self.scheduler.add(req)

    def step(self) -> list[CoreOutput]:
        outputs, self._early = self._early, []
        c = self.counters
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        for victim in sched.preempted:  # never expected (blocks are sized for the fullest step)
            self.runner.release(victim.request_id)
        if not sched:
            return outputs
        pooled = self.runner.execute(sched.scheduled, self.kv)
        t1 = time.perf_counter()
        for s, data in zip(sched.scheduled, pooled):
            req = s.request
            req.num_computed_tokens += s.num_tokens
            req.prefill_done = True
            c.prompt_tokens += req.num_prompt_tokens
            raw, shape = tensor_to_bytes(data)
            outputs.append(CoreOutput(req.request_id, finish_reason="stop", num_cached_tokens=0,
                                      first_scheduled_time=req.first_scheduled_time or -1.0,
                                      pooled=raw, pooled_shape=shape))
            self._finish(req, RequestStatus.FINISHED_STOPPED)
        c.num_steps += 1
        c.time_launch += t1 - t0
        c.time_update += time.perf_counter() - t1
        return outputs
