"""XlaGraphRunner: every step at one of a few static shapes, all compiled at start-up.

XLA compiles one executable per distinct graph, and a graph's shapes are part of it. A step is therefore
padded (layout.pad_step) to
  - a token bucket T (powers of two from 16 up to max_num_batched_tokens),
  - max_num_seqs sequence rows and max_model_len / block_size block-table columns (fixed),
and runs as two programs:
  1. the forward pass for T: ids, positions and the padded step in, the KV caches updated in place
     (aliased), hidden states out, padded to the largest bucket so that (2) does not depend on T;
  2. logits for R rows (R in powers of two from 8 up to max_num_seqs): gather + LM head, copied to the host,
     where the sampler runs (its per-request features would otherwise each add shapes).
capture() compiles all of them once (a progress bar), so serving compiles nothing: len(T) + len(R)
executables in all. Where torch-xla's persistent cache is on (platform.check_config), a later process
finds them on disk instead of compiling (on PJRT devices that can deserialize executables: TPU, GPU).
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Optional

import torch
from tqdm.auto import tqdm

from pageport.kernels_tpu.layout import (MIN_ROW_BUCKET, MIN_TOKEN_BUCKET, buckets, num_table_columns, pad_step,
                                         pick_bucket)
from pageport.platforms import AttentionMetadata, GraphRunner

logger = logging.getLogger(__name__)

# O(T x S x context x heads) score elements per layer above which the XLA-native attention is refused
NATIVE_ATTENTION_LIMIT = 1 << 28


def _no_inference_mode():
    """torch-xla 2.9 cannot trace some ops on inference tensors ("Cannot set version_counter for
    inference tensor"); the model runner's step is under torch.inference_mode, so XLA work leaves it."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def compile_count() -> int:
    """XLA compilations so far in this process (torch_xla's CompileTime metric)."""
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class XlaGraphRunner(GraphRunner):
    def __init__(self, platform, model, kv_caches: list[torch.Tensor], config):
        self.platform = platform
        self.model = model
        self.kv_caches = kv_caches
        self.device = platform.device
        self.block_size = config.block_size
        self.token_buckets = buckets(config.max_num_batched_tokens, MIN_TOKEN_BUCKET)
        self.num_seqs = config.max_num_seqs
        self.row_buckets = buckets(config.max_num_seqs, MIN_ROW_BUCKET)
        self.width = num_table_columns(config.max_model_len, config.block_size)
        self._hidden: Optional[torch.Tensor] = None  # last forward's hidden states, [max bucket, hidden]
        self._returned = None  # weakref to the view run() handed out
        self.compiles_at_capture: Optional[int] = None  # this process's XLA compilations once capture() ended
        self.compiles_in_capture: Optional[int] = None  # those capture() did (loading + every bucket)
        self.capture_seconds = 0.0
        backend = model.attn_backend
        if not getattr(backend, "use_kernel", False):
            elems = (self.token_buckets[-1] * backend.layout.num_heads_padded * self.num_seqs
                     * self.width * self.block_size)
            if elems > NATIVE_ATTENTION_LIMIT:
                raise ValueError(
                    f"{platform.name}: without the TPU kernel, attention scores every token against all "
                    f"max_num_seqs x max_model_len slots ({elems / 2**20:.0f} M elements per layer at "
                    f"max_num_batched_tokens={self.token_buckets[-1]}, max_num_seqs={self.num_seqs}, "
                    f"max_model_len={config.max_model_len}); lower those (e.g. 128 / 8 / 512)")

    # start-up ---------------------------------------------------------------------------------
    def capture(self) -> None:
        import torch_xla
        t0 = time.perf_counter()
        before = compile_count()
        torch_xla.sync()  # weights and the zeroed KV caches become device data first
        shapes = [("tokens", t) for t in self.token_buckets] + [("rows", r) for r in self.row_buckets]
        with _no_inference_mode():
            for kind, size in tqdm(shapes, desc="XLA: compiling shape buckets", unit="graph", leave=False):
                if kind == "tokens":
                    self._forward(self._dummy(size), size)
                else:
                    self._logits([0] * size)
        self.capture_seconds = time.perf_counter() - t0
        self.compiles_at_capture = compile_count()
        self.compiles_in_capture = self.compiles_at_capture - before
        logger.info("XLA: %d token buckets %s and %d logits buckets %s compiled in %.1f s (%d compilations)",
                    len(self.token_buckets), self.token_buckets, len(self.row_buckets), self.row_buckets,
                    self.capture_seconds, self.compiles_in_capture)

    def _dummy(self, num_tokens: int):
        step = pad_step([0], [], torch.zeros(0, self.width, dtype=torch.int32), torch.zeros(0, dtype=torch.int64),
                        self.block_size, num_tokens, self.num_seqs, self.width)
        zeros = torch.zeros(num_tokens, dtype=torch.long)
        return zeros, zeros, step

    # one step -------------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        n = metadata.num_actual_tokens
        size = pick_bucket(n, self.token_buckets)
        if size is None or metadata.num_seqs > self.num_seqs or metadata.max_seq_len > self.width * self.block_size:
            # the scheduler keeps every step within these limits; an eager fallback would not run on XLA
            raise RuntimeError(f"step of {n} tokens, {metadata.num_seqs} sequences, up to {metadata.max_seq_len} "
                               f"positions is outside the compiled buckets (tokens {self.token_buckets}, "
                               f"{self.num_seqs} sequences, {self.width * self.block_size} positions)")
        with _no_inference_mode():
            ids = torch.zeros(size, dtype=torch.long)
            pos = torch.zeros(size, dtype=torch.long)
            ids[:n] = input_ids.cpu()
            pos[:n] = positions.cpu()
            step = pad_step(metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.block_table.cpu(),
                            metadata.slot_mapping.cpu(), self.block_size, size, self.num_seqs, self.width)
            self._forward((ids, pos, step), size)
            view = self._hidden[:n]  # lazy: never materialized (compute_logits reads the padded buffer)
        self._returned = weakref.ref(view)
        return view

    def _forward(self, inputs, size: int) -> None:
        """Program (1) for token bucket `size`, executed now: hidden states stay on the device."""
        import torch_xla
        ids, pos, step = inputs
        dev = self.device
        hidden = self.model(ids.to(dev), pos.to(dev), self.kv_caches, step.to(dev))
        self._hidden = torch.nn.functional.pad(hidden, (0, 0, 0, self.token_buckets[-1] - size))
        del hidden  # not an output of the program
        torch_xla.sync()

    def compute_logits(self, hidden: torch.Tensor, rows: list[int]) -> Optional[torch.Tensor]:
        """float32 logits [len(rows), vocab] on the host for these rows of run()'s hidden states, in
        compiled row buckets; None for any other hidden (the caller computes them itself)."""
        if self._returned is None or self._returned() is not hidden:
            return None
        with _no_inference_mode():
            return self._logits(rows)

    def _logits(self, rows: list[int]) -> torch.Tensor:
        out = []
        cap = self.row_buckets[-1]
        for start in range(0, max(len(rows), 1), cap):
            chunk = rows[start:start + cap]
            size = pick_bucket(len(chunk), self.row_buckets)
            idx = torch.zeros(size, dtype=torch.long)
            idx[:len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
            logits = self.model.compute_logits(self._hidden.index_select(0, idx.to(self.device)))
            out.append(logits.cpu()[:len(chunk)])
        return torch.cat(out) if len(out) > 1 else out[0]
