"""Turns a scheduled step into model inputs, runs the model, samples."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from pageport.core.config import EngineConfig
from pageport.core.kv_cache import KVCacheManager
from pageport.core.outputs import Logprob
from pageport.core.sampler import Sampler, prompt_logprobs
from pageport.core.scheduler import SchedulerOutput
from pageport.platforms import AttentionMetadata, Platform

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    request_id: str
    token_id: Optional[int]  # None when this step only advanced a prompt chunk
    logprob: float = 0.0
    logprobs: Optional[dict[int, Logprob]] = None
    prompt_logprobs: Optional[list[dict[int, Logprob]]] = None  # this chunk's positions


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, model: torch.nn.Module):
        self.config = config
        self.platform = platform
        self.model = model
        self.device = platform.device
        self.block_size = config.block_size
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.graphs = None  # the platform's GraphRunner, if it has one

    # KV cache -------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        m = self.model
        shape = m.attn_backend.kv_cache_shape(1, self.block_size, m.num_kv_heads, m.head_size)
        return math.prod(shape) * self.config.dtype.itemsize * m.num_layers

    def profile_num_blocks(self) -> int:
        """Blocks that fit the platform's KV budget after a worst-case forward pass."""
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        peak = self._profile_peak_bytes()
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        budget = self.platform.kv_cache_bytes(self.config, model_bytes, peak)
        return max(2, budget // self.kv_block_bytes())

    def _profile_peak_bytes(self) -> int:
        """Peak activation memory of one full-budget step (0 where the platform cannot measure it)."""
        return getattr(self.platform, "profile_peak_bytes", lambda run: 0)(self._dummy_step)

    @torch.inference_mode()
    def _dummy_step(self) -> None:
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        m = self.model
        caches = [torch.zeros(m.attn_backend.kv_cache_shape(2 + n // self.block_size, self.block_size,
                                                            m.num_kv_heads, m.head_size),
                              dtype=self.config.dtype, device=self.device)] * m.num_layers
        blocks = list(range(1, 2 + n // self.block_size))
        md = self._metadata([n], [n], [blocks], [blocks[p // self.block_size] * self.block_size
                                                 + p % self.block_size for p in range(n)])
        hidden = m(torch.zeros(n, dtype=torch.long, device=self.device),
                   torch.arange(n, device=self.device), caches, md)
        m.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        self.platform.synchronize()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        shape = m.attn_backend.kv_cache_shape(num_blocks, self.block_size, m.num_kv_heads, m.head_size)
        self.kv_caches = [torch.zeros(shape, dtype=self.config.dtype, device=self.device)
                          for _ in range(m.num_layers)]
        if not self.config.enforce_eager:
            self.graphs = self.platform.graph_runner(m, self.kv_caches, self.config)
            if self.graphs is not None:
                self.graphs.capture()

    # one step ------------------------------------------------------------------------------
    def _metadata(self, query_lens: list[int], seq_lens: list[int], block_rows: list[list[int]],
                  slot_mapping: list[int]) -> AttentionMetadata:
        dev = self.device
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        width = max(len(r) for r in block_rows)
        table = torch.zeros(len(block_rows), width, dtype=torch.int32)
        for i, row in enumerate(block_rows):
            table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return AttentionMetadata(
            num_actual_tokens=qsl[-1],
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=table.to(dev),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens), block_size=self.block_size)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, kv: KVCacheManager) -> list[StepResult]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens, block_rows = [], [], []
        for s in sched.scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_tokens
            blocks = kv.block_ids(r)
            input_ids.extend(r.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(s.num_tokens)
            seq_lens.append(end)
            block_rows.append(blocks)
        md = self._metadata(query_lens, seq_lens, block_rows, slots)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.graphs.run(ids, pos, md) if self.graphs is not None else None
        if hidden is None:
            hidden = self.model(ids, pos, self.kv_caches, self.model.attn_backend.build_metadata(md))

        results = [StepResult(s.request.request_id, None) for s in sched.scheduled]
        sampling = [i for i, s in enumerate(sched.scheduled) if s.samples]
        if sampling:
            logits = self._logits(hidden, [md.query_start_loc_cpu[i + 1] - 1 for i in sampling])
            out = self.sampler(logits, [sched.scheduled[i].request for i in sampling])
            for k, i in enumerate(sampling):
                results[i].token_id = out.token_ids[k]
                results[i].logprob = out.chosen_logprobs[k]
                results[i].logprobs = out.logprobs[k]
        for i, s in enumerate(sched.scheduled):
            r = s.request
            if r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.num_prompt_tokens:
                results[i].prompt_logprobs = self._prompt_logprobs(hidden, md, i, s.request, s.num_tokens)
        return results

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """float32 logits of these rows of `hidden`; a GraphRunner with `compute_logits` may produce them
        (e.g. the XLA runner, in compiled shape buckets, on the host) or return None to leave it here."""
        if self.graphs is not None and hasattr(self.graphs, "compute_logits"):
            logits = self.graphs.compute_logits(hidden, rows)
            if logits is not None:
                return logits
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])

    def _prompt_logprobs(self, hidden, md, i, r, n) -> list[dict[int, Logprob]]:
        """Logprobs of prompt tokens p+1 given p, for the prompt positions in this chunk."""
        start = r.num_computed_tokens
        end = min(start + n, r.num_prompt_tokens - 1)
        if end <= start:
            return []
        row0 = md.query_start_loc_cpu[i]
        logits = self._logits(hidden, list(range(row0, row0 + end - start)))
        nxt = torch.tensor(r.prompt_token_ids[start + 1:end + 1], device=logits.device)
        return prompt_logprobs(logits, nxt, r.params.prompt_logprobs)
