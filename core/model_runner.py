"""Turns a scheduled step into model inputs, runs the model, samples.

The inputs live in a persistent batch (`InputBatch`): every running request owns a row whose block table
is kept across steps and only grows by the blocks it gained; a step gathers its rows with numpy, writes
them into pinned host buffers (two sets, used in turn, so a step's copies never race the next step's
preparation) and copies them to the device once, non-blocking. Rows are laid out for several query tokens
per request (a chunk of a prompt, or a token and its proposals) and each token carries its LoRA slot
(0 = the base model), so one step mixes adapters.

`execute` returns a `StepOutput` whose sampled ids are still on the device: with asynchronous scheduling
the engine core prepares and launches the next step first, feeding those ids to it on the device, and
reads them on the host one step later.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pageport.core.config import EngineConfig
from pageport.core.kv_cache import KVCacheManager
from pageport.core.outputs import Logprob
from pageport.core.request import Request
from pageport.core.sampler import Sampler, prompt_logprobs
from pageport.core.scheduler import SchedulerOutput
from pageport.models.multimodal.inputs import EncoderCache
from pageport.platforms import AttentionMetadata, Platform

logger = logging.getLogger(__name__)

_NO_MROPE = (None, 0)  # a text-only request of an M-RoPE model: position = index on the three axes


@dataclass
class StepOutput:
    """What one step sampled. `token_ids` stays on the device until `token_list()` reads it."""
    requests: list[Request]  # the rows that sampled, in order
    token_ids: torch.Tensor  # [len(requests)] int64, on the device
    logprobs: list[Optional[dict[int, Logprob]]] = field(default_factory=list)
    chosen_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)  # request id -> chunk's
    timing: Optional[tuple] = None  # device events around the step (profiling)
    # speculative decoding: row -> (the tokens it emitted: accepted proposals + one sampled, proposals verified)
    spec: Optional[dict[int, tuple[list[int], int]]] = None
    grammar_goes_on: Optional[dict[int, bool]] = None  # row -> its grammar took the token and is not complete
    _host: Optional[torch.Tensor] = None
    _event: Optional[object] = None
    _list: Optional[list[int]] = None

    def token_list(self) -> list[int]:
        if self._list is None:
            if self._event is not None:
                self._event.synchronize()
            self._list = (self._host if self._host is not None else self.token_ids).tolist()
        return self._list


class PendingStep:
    """A step launched but not ended: pipeline stage 0 samples once the last stage's hidden states are back."""

    def __init__(self, finish):
        self._finish = finish

    def result(self) -> StepOutput:
        return self._finish()


class InputBatch:
    """Rows that outlive a step: request id -> row and the row's block table."""

    def __init__(self, max_rows: int, max_blocks: int):
        self.block_table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self.num_blocks = [0] * max_rows  # a list: numpy scalar reads cost more than the work they guard
        self.row_of: dict[str, int] = {}
        self._free = list(range(max_rows - 1, -1, -1))

    def row(self, req: Request, blocks: list) -> int:
        """The request's row, its block table brought up to date (blocks are only ever appended)."""
        row = self.row_of.get(req.request_id)
        if row is None:
            row = self._free.pop()
            self.row_of[req.request_id] = row
            self.num_blocks[row] = 0
        have, now = self.num_blocks[row], len(blocks)
        if now != have:
            if now < have:  # the request was preempted and came back: rebuild
                have = 0
            self.block_table[row, have:now] = [b.block_id for b in blocks[have:now]]
            self.num_blocks[row] = now
        return row

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)


class _Staging:
    """Host buffers for one step's inputs (pinned where the device copies from pinned memory)."""

    def __init__(self, max_tokens: int, max_rows: int, max_blocks: int, pin: bool, mrope: bool = False):
        def buf(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.ids = buf(max_tokens, dtype=torch.long)
        self.pos = buf(max_tokens, dtype=torch.long)
        if mrope:  # (t, h, w) positions of steps holding image tokens (M-RoPE models only)
            self.pos3 = buf(3, max_tokens, dtype=torch.long)
        self.slots = buf(max_tokens, dtype=torch.long)
        self.qsl = buf(max_rows + 1, dtype=torch.int32)
        self.seq_lens = buf(max_rows, dtype=torch.int32)
        self.table = buf(max_rows * max_blocks, dtype=torch.int32)
        self.logit_rows = buf(max_rows, dtype=torch.long)
        self.pend_dst = buf(max_rows, dtype=torch.long)
        self.pend_src = buf(max_rows, dtype=torch.long)
        self.sampled = buf(max_rows, dtype=torch.long)  # the step's sampled ids, copied back for the host
        self.lora = buf(max_tokens, dtype=torch.long)  # each token's LoRA slot (0: the base model)
        # numpy views, made once (each .numpy() call costs microseconds)
        self.np = {k: v.numpy() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


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
        self.logits_hook = None  # (logits, requests) -> None, in place, before sampling
        self.hidden_hook = None  # (hidden, scheduled, query_start_loc) -> None, after the forward pass (EAGLE)
        # (scheduled, query_start_loc) -> whether the pass keeps inner layers' states (EAGLE-3), before it
        self.aux_hook = None
        self.max_blocks = -(-config.max_model_len // config.block_size) + 1
        self.batch = InputBatch(config.max_num_seqs, self.max_blocks)
        # the device copies from pinned host memory asynchronously; on the CPU a "copy" is the buffer itself
        self.async_copies = self.device.type in ("cuda", "xpu")
        pin = self.async_copies and torch.cuda.is_available() if self.device.type == "cuda" else False
        n_tok = max(config.max_num_batched_tokens or 2048, config.max_num_seqs)
        # a set per step that can be in flight: two (async scheduling), or one per pipeline stage
        # M-RoPE (Qwen2-VL): three position ids a token where a prompt's images are; a delta a request after them
        self.mrope = bool(getattr(model, "uses_mrope", False))
        self._staging = [_Staging(n_tok, config.max_num_seqs, self.max_blocks, pin, self.mrope)
                         for _ in range(max(2, config.pipeline_parallel_size))]
        self._step = 0
        self.encoder_cache = EncoderCache() if getattr(model, "supports_multimodal", False) else None
        self.lora = getattr(model, "lora", None)  # models/lora LoRAModel when LoRA is enabled
        self.draft: Optional[ModelRunner] = None  # a draft model's runner: its KV cache shares this block pool
        self.pipeline = None  # a pipeline stage's link to the others (core/executor PipelineLink)

    # KV cache -------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        m = self.model
        shape = m.attn_backend.kv_cache_shape(1, self.block_size, m.num_kv_heads, m.head_size)
        layers = len(getattr(m, "layer_range", range(m.num_layers)))  # a pipeline stage caches its own layers
        return math.prod(shape) * self.config.kv_cache_torch_dtype().itemsize * layers

    def profile_num_blocks(self) -> int:
        """Blocks that fit the platform's KV budget after a worst-case forward pass."""
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        peak = self._profile_peak_bytes()
        runners = [self] + ([self.draft] if self.draft is not None else [])
        model_bytes = sum(p.numel() * p.element_size() for r in runners for p in r.model.parameters())
        budget = self.platform.kv_cache_bytes(self.config, model_bytes, peak)
        return max(2, budget // sum(r.kv_block_bytes() for r in runners))

    def _profile_peak_bytes(self) -> int:
        """Peak activation memory of one full-budget step (0 where the platform cannot measure it)."""
        return getattr(self.platform, "profile_peak_bytes", lambda run: 0)(self._dummy_step)

    @torch.inference_mode()
    def _dummy_step(self) -> None:
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        m = self.model
        caches = [torch.zeros(m.attn_backend.kv_cache_shape(2 + n // self.block_size, self.block_size,
                                                            m.num_kv_heads, m.head_size),
                              dtype=self.config.kv_cache_torch_dtype(), device=self.device)] * m.num_layers
        blocks = list(range(1, 2 + n // self.block_size))
        md = self._metadata_from_lists([n], [n], [blocks], [blocks[p // self.block_size] * self.block_size
                                                            + p % self.block_size for p in range(n)])
        stage = {}
        if self.pipeline is not None and self.pipeline.stage > 0:  # the activations a previous stage would send
            h = torch.zeros(n, m.config.hidden_size, dtype=self.config.dtype, device=self.device)
            stage = {"intermediate": (h, h.clone())}
        hidden = m(torch.zeros(n, dtype=torch.long, device=self.device),
                   torch.arange(n, device=self.device), caches, md, **stage)
        if isinstance(hidden, tuple):  # pipeline stage 0: (hidden, residual) for the next stage; its LM head too
            hidden = hidden[0]
        if not stage:
            m.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        self.platform.synchronize()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        shape = m.attn_backend.kv_cache_shape(num_blocks, self.block_size, m.num_kv_heads, m.head_size)
        owned = getattr(m, "layer_range", range(m.num_layers))
        dtype = self.config.kv_cache_torch_dtype()
        none = torch.empty(0, dtype=dtype, device=self.device)  # another pipeline stage's layer
        self.kv_caches = [_zeros(shape, dtype, self.device) if i in owned else none for i in range(m.num_layers)]
        if self.draft is not None:
            self.draft.allocate_kv_cache(num_blocks)
        if not self.config.enforce_eager:
            self.graphs = self.platform.graph_runner(m, self.kv_caches, self.config)
            if self.graphs is not None:
                self.graphs.capture()

    # one step ------------------------------------------------------------------------------
    def _metadata_from_lists(self, query_lens, seq_lens, block_rows, slot_mapping) -> AttentionMetadata:
        """Metadata from Python lists (profiling only; steps use the persistent batch)."""
        dev = self.device
        qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
        width = max(len(r) for r in block_rows)
        table = torch.zeros(len(block_rows), width, dtype=torch.int32)
        for i, row in enumerate(block_rows):
            table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return AttentionMetadata(
            num_actual_tokens=int(qsl[-1]), query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_table=table.to(dev),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=list(seq_lens), block_size=self.block_size)

    def release(self, request_id: str) -> None:
        """The request left the running set (finished or preempted): its row is free."""
        self.batch.release(request_id)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, kv: KVCacheManager,
                prev: Optional[StepOutput] = None) -> StepOutput:
        """Prepare, launch and sample one step. `prev`: the step still in flight, whose sampled ids are the
        inputs of the requests that have a pending token."""
        bs, dev, batch = self.block_size, self.device, self.batch
        st = self._staging[self._step % len(self._staging)]
        self._step += 1
        scheduled = sched.scheduled
        num_rows = len(scheduled)
        npb = st.np
        rows_l, starts_l, qlens_l, ids_l = [], [], [], []
        pend_dst, pend_src = [], []
        has_spec = False
        t = 0
        row_of, req_blocks = batch.row, kv.req_blocks
        mm_rows = []
        for s in scheduled:  # per request, never per token
            r = s.request
            rows_l.append(row_of(r, req_blocks[r.request_id]))
            start, n = r.num_computed_tokens, s.num_tokens
            starts_l.append(start)
            qlens_l.append(n)
            if r.mm_inputs is not None:
                mm_rows.append((r, t, start, n))
            if start + n <= len(r.token_ids):
                if n == 1:
                    ids_l.append(r.token_ids[start])
                else:
                    ids_l += r.token_ids[start:start + n]
            elif s.spec_token_ids:  # its last token, then the proposals to verify
                ids_l += r.token_ids[start:]
                ids_l += s.spec_token_ids
                has_spec = True
            else:  # the last input is the token the step in flight sampled for it
                if n > 1:
                    ids_l += r.token_ids[start:start + n - 1]
                ids_l.append(0)
                pend_dst.append(t + n - 1)
                pend_src.append(r.sample_index)  # its row in the step in flight
            t += n
        rows = np.array(rows_l, dtype=np.int64)
        starts = np.array(starts_l, dtype=np.int64)
        qlens = np.array(qlens_l, dtype=np.int64)
        npb["ids"][:t] = ids_l
        total = t
        qsl = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        seq_lens = starts + qlens
        # positions and slots of every token, vectorised
        if total == num_rows:  # one token a row (decode)
            pos, tok_rows = starts, rows
        else:
            tok_row = np.repeat(np.arange(num_rows), qlens)
            pos, tok_rows = np.arange(total, dtype=np.int64) - qsl[tok_row] + starts[tok_row], rows[tok_row]
        blk = batch.block_table[tok_rows, pos // bs]
        npb["pos"][:total] = pos
        npb["slots"][:total] = blk.astype(np.int64) * bs + pos % bs
        npb["qsl"][:num_rows + 1] = qsl
        npb["seq_lens"][:num_rows] = seq_lens
        width = int(-(-seq_lens.max() // bs))
        npb["table"][:num_rows * width].reshape(num_rows, width)[:] = batch.block_table[rows, :width]
        table = st.table[:num_rows * width].view(num_rows, width)

        nb = self.async_copies
        md = AttentionMetadata(
            num_actual_tokens=total, query_start_loc=st.qsl[:num_rows + 1].to(dev, non_blocking=nb),
            seq_lens=st.seq_lens[:num_rows].to(dev, non_blocking=nb), block_table=table.to(dev, non_blocking=nb),
            slot_mapping=st.slots[:total].to(dev, non_blocking=nb),
            max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist(), block_size=bs)
        input_ids = st.ids[:total].to(dev, non_blocking=nb)
        if self.mrope:
            positions = self._mrope_positions(scheduled, pos, qsl, starts, qlens, st).to(dev, non_blocking=nb)
        else:
            positions = st.pos[:total].to(dev, non_blocking=nb)
        if pend_dst:  # feed the in-flight step's samples without a trip to the host
            k = len(pend_dst)
            npb["pend_dst"][:k] = pend_dst
            npb["pend_src"][:k] = pend_src
            input_ids[st.pend_dst[:k].to(dev, non_blocking=nb)] = \
                prev.token_ids[st.pend_src[:k].to(dev, non_blocking=nb)]

        lora_index = None
        if self.lora is not None:  # each token's adapter slot, from its row's (the engine core assigned them)
            slots_l = [s.request.lora_slot for s in scheduled]
            active = sorted(set(slots_l) - {0})
            if active:
                npb["lora"][:total] = slots_l if total == num_rows else np.repeat(slots_l, qlens)
                lora_index = st.lora[:total].to(dev, non_blocking=nb)
            self.lora.set_token_index(lora_index, active)

        # EAGLE-3 keeps inner layers' states through layer hooks, which a graph replay skips: such passes are eager
        eager = self.aux_hook is not None and self.aux_hook(scheduled, qsl)
        if mm_rows:  # image features in place of their placeholders' embeddings (never for text-only batches)
            hidden = self.model(input_ids, positions, self.kv_caches, self.model.attn_backend.build_metadata(md),
                                inputs_embeds=self._mm_embeds(input_ids, mm_rows))
        else:
            hidden = None
            if self.graphs is not None and not eager:
                hidden = (self.graphs.run(input_ids, positions, md) if lora_index is None
                          else self.graphs.run_lora(input_ids, positions, md, lora_index))
        if hidden is None and self.pipeline is not None:
            link = self.pipeline.run(self.model, input_ids, positions, self.kv_caches,
                                     self.model.attn_backend.build_metadata(md))
            if link is None:  # a later pipeline stage: its part is done, stage 0 samples
                return StepOutput([], torch.zeros(0, dtype=torch.long, device=dev))
            # stage 0: the step ends when the last stage's hidden states are back (the core may launch others first)
            return PendingStep(lambda: self._sample_step(link.wait(), scheduled, qsl, st, has_spec))
        if hidden is None:
            hidden = self.model(input_ids, positions, self.kv_caches, self.model.attn_backend.build_metadata(md))
        return self._sample_step(hidden, scheduled, qsl, st, has_spec)

    def _sample_step(self, hidden: torch.Tensor, scheduled: list, qsl: np.ndarray, st: _Staging,
                     has_spec: bool) -> StepOutput:
        """The step's samples (and prompt logprobs) from its final hidden states."""
        dev, npb, nb = self.device, st.np, self.async_copies
        if self.hidden_hook is not None:
            self.hidden_hook(hidden, scheduled, qsl)

        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        reqs = [scheduled[i].request for i in sampling]
        if has_spec:
            out = self._sample_spec(hidden, qsl, scheduled, sampling, reqs)
        elif sampling:
            k = len(sampling)
            lr = npb["logit_rows"]
            lr[:k] = qsl[np.asarray(sampling) + 1] - 1
            logits = self._logits(hidden, st.logit_rows[:k].to(dev, non_blocking=nb), lr[:k].tolist())
            if self.logits_hook is not None:
                self.logits_hook(logits, reqs)  # e.g. grammar masks
            sampled = self.sampler(logits, reqs)
            out = StepOutput(reqs, sampled.token_ids, sampled.logprobs, sampled.chosen_logprobs)
            for j, r in enumerate(reqs):
                r.sample_index = j
        else:
            out = StepOutput([], torch.zeros(0, dtype=torch.long, device=dev))
        if self.async_copies and sampling:
            out._host = st.sampled[:len(reqs)]  # read one step later, before this staging set is reused
            out._host.copy_(out.token_ids, non_blocking=True)
            out._event = torch.Event(device=dev)
            out._event.record()
        for i, s in enumerate(scheduled):
            r = s.request
            if r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.num_prompt_tokens:
                out.prompt_logprobs[r.request_id] = self._prompt_logprobs(hidden, int(qsl[i]), r, s.num_tokens)
        return out

    def _mm_embeds(self, input_ids: torch.Tensor, mm_rows: list) -> torch.Tensor:
        """The step's token embeddings with each image's features written over the part of its placeholder run
        that this step computes (a chunked prompt takes the matching slice of the features)."""
        embeds = self.model.embed_input_ids(input_ids)
        for r, t0, start, n in mm_rows:
            for m in r.mm_inputs:
                lo, hi = max(m.offset, start), min(m.offset + m.length, start + n)
                if lo < hi:
                    feats = self.encoder_cache.get(m, self._encode_image)
                    embeds[t0 + lo - start:t0 + hi - start] = feats[lo - m.offset:hi - m.offset].to(embeds.dtype)
        return embeds

    def _mrope_positions(self, scheduled, pos: np.ndarray, qsl: np.ndarray, starts: np.ndarray,
                         qlens: np.ndarray, st: _Staging) -> torch.Tensor:
        """The step's positions for an M-RoPE model, in `st`: each token's index plus its request's delta, the
        same on the three axes ([T]), or [3, T] when the step holds prompt tokens up to a prompt's last image,
        which take the (t, h, w) the model computed for that prompt (once per request, kept on it)."""
        rows = [self._mrope_of(s.request) for s in scheduled]
        total = int(qsl[-1])
        deltas = np.fromiter((d for _, d in rows), dtype=np.int64, count=len(rows))
        flat = pos + (deltas if total == len(rows) else np.repeat(deltas, qlens))
        grid = [(i, p) for i, (p, _) in enumerate(rows) if p is not None and starts[i] < p.shape[1]]
        if not grid:
            st.np["pos"][:total] = flat
            return st.pos[:total]
        p3 = st.np["pos3"]
        p3[:, :total] = flat
        for i, p in grid:
            a, b = int(starts[i]), min(int(starts[i] + qlens[i]), p.shape[1])
            p3[:, qsl[i]:qsl[i] + b - a] = p[:, a:b]
        return st.pos3[:, :total]

    def _mrope_of(self, r: Request) -> tuple[Optional[np.ndarray], int]:
        """(positions [3, E] of the prompt up to its last image or None, delta of the tokens after)."""
        if r.mm_inputs is None:
            return _NO_MROPE
        if r.mrope is None:
            r.mrope = self.model.mrope_positions(r.mm_inputs)
        return r.mrope

    def _encode_image(self, m) -> torch.Tensor:
        if m.grid_thw is not None:  # native-resolution patches (Qwen2-VL) with their grid
            return self.model.embed_images(m.pixel_values().to(self.device), grid_thw=[m.grid_thw])[0]
        if m.image_size is not None:  # tiled images (LLaVA-NeXT) cut their padding by the original size
            return self.model.embed_images(m.pixel_values().to(self.device), image_sizes=[m.image_size])[0]
        return self.model.embed_images(m.pixel_values().to(self.device))[0]

    def _logits(self, hidden: torch.Tensor, rows_dev: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """float32 logits of these rows of `hidden`; a GraphRunner with `compute_logits` may produce them
        (e.g. the XLA runner, in compiled shape buckets, on the host) or return None to leave it here."""
        if self.graphs is not None and hasattr(self.graphs, "compute_logits"):
            logits = self.graphs.compute_logits(hidden, rows)
            if logits is not None:
                return logits
        return self.model.compute_logits(hidden[rows_dev])

    def _sample_spec(self, hidden, qsl, scheduled, sampling: list[int], reqs: list[Request]) -> StepOutput:
        """A step with proposals: logits at each proposing row's 1 + k positions, verified by the rejection
        sampler; the other rows sample as usual. Read on the host here (speculation runs synchronously)."""
        from pageport.core.spec_decode.rejection import SpecRow, verify
        dev = self.device
        positions: list[int] = []
        spec_rows, plain = [], []  # (j, SpecRow) / (j, logits row)
        for j, i in enumerate(sampling):
            s, end = scheduled[i], int(qsl[i + 1])
            k = len(s.spec_token_ids)
            if k:
                q = s.request.spec_probs  # a draft model's distributions (None for n-gram proposals)
                spec_rows.append((j, SpecRow(s.request, list(s.spec_token_ids), len(positions),
                                             None if q is None else q[:k])))
                positions += range(end - 1 - k, end)
            else:
                plain.append((j, len(positions)))
                positions.append(end - 1)
        logits = self._logits(hidden, torch.tensor(positions, device=dev), positions)
        token_ids = [0] * len(reqs)
        logprobs: list[Optional[dict[int, Logprob]]] = [None] * len(reqs)
        chosen = [0.0] * len(reqs)
        if plain:
            sub = logits[torch.tensor([p for _, p in plain], device=logits.device)]
            sub_reqs = [reqs[j] for j, _ in plain]
            if self.logits_hook is not None:
                self.logits_hook(sub, sub_reqs)
            sampled = self.sampler(sub, sub_reqs)
            for m, (tok, (j, _)) in enumerate(zip(sampled.token_ids.tolist(), plain)):
                token_ids[j], logprobs[j], chosen[j] = tok, sampled.logprobs[m], sampled.chosen_logprobs[m]
        masked = [row for _, row in spec_rows if row.request.spec_mask is not None]
        if masked:  # constrained rows: their grammar's masks at every verified position
            from pageport.core.structured_output import apply_bitmask
            mask = torch.full((logits.shape[0], masked[0].request.spec_mask.shape[1]), -1, dtype=torch.int32)
            for row in masked:
                mask[row.offset:row.offset + 1 + len(row.draft)] = row.request.spec_mask
            apply_bitmask(logits, mask)
        spec: dict[int, tuple[list[int], int]] = {}
        for (j, row), toks in zip(spec_rows, verify(logits, [r for _, r in spec_rows])):
            token_ids[j] = toks[-1]
            spec[j] = (toks, len(row.draft))
        for j, r in enumerate(reqs):
            r.sample_index = j
        out = StepOutput(reqs, torch.tensor(token_ids, dtype=torch.long), logprobs, chosen, spec=spec)
        out._list = token_ids
        return out

    def _prompt_logprobs(self, hidden, row0: int, r: Request, n: int) -> list[dict[int, Logprob]]:
        """Logprobs of prompt tokens p+1 given p, for the prompt positions in this chunk."""
        start = r.num_computed_tokens
        end = min(start + n, r.num_prompt_tokens - 1)
        if end <= start:
            return []
        rows = list(range(row0, row0 + end - start))
        logits = self._logits(hidden, torch.tensor(rows, device=hidden.device), rows)
        nxt = torch.tensor(r.prompt_token_ids[start + 1:end + 1], device=logits.device)
        return prompt_logprobs(logits, nxt, r.params.prompt_logprobs)


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. On the CPU through calloc (numpy): the OS hands out zero pages as they are first
    touched, so a cache of several GiB costs nothing until it fills (torch.zeros writes every page)."""
    if device.type == "cpu":
        raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)
