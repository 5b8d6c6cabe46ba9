"""CUDA graphs for decode steps: captured once per batch size, replayed with padded inputs.

Also used by the ROCm platform (torch's graph API is the same on HIP).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from pageport.platforms import AttentionMetadata, GraphRunner


def capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    return sizes if sizes[-1] == top else sizes + [top]


class CudaGraphRunner(GraphRunner):
    """Decode-only steps (one query token per sequence) up to the largest captured batch.

    Padding rows write to slot -1 (skipped) and attend to one token of the null block 0,
    so their outputs are finite and ignored.

    With LoRA each size is captured twice: without adapters (steps of base rows only pay nothing) and with
    every slot live, the tokens' slots read from a static buffer (padding rows: slot 0).
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], config):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(config.max_num_seqs)
        self.block_size = config.block_size
        self.max_seq_len = config.max_model_len
        n, dev = self.sizes[-1], kv_caches[0].device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(n, math.ceil(self.max_seq_len / self.block_size), dtype=torch.int32,
                                       device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.lora = getattr(model, "lora", None)  # models/lora LoRAModel
        self.lora_index = torch.zeros(n, dtype=torch.long, device=dev)
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_outputs: dict[int, torch.Tensor] = {}
        self.metadata: dict = {}  # keeps each graph's backend buffers (split-KV workspace) alive

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=bs, query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs], max_query_len=1,
            max_seq_len=self.max_seq_len, query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[self.max_seq_len] * bs, block_size=self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in tqdm(list(reversed(self.sizes)), desc="Capturing CUDA graphs", leave=False):
            md = self.metadata[bs] = self.model.attn_backend.build_metadata(self._metadata(bs))
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
            pool = self._capture(bs, args, self.graphs, self.outputs, pool)
            if self.lora is not None:
                slots = list(range(1, self.lora.max_loras + 1))
                # set again after the warm-up: a new index view, so that what the ops derive from the index once
                # per step (the tokens sorted by slot) is computed inside the graph, not kept from the warm-up
                fresh = lambda bs=bs: self.lora.set_token_index(self.lora_index[:bs], slots)  # noqa: E731
                try:
                    pool = self._capture(bs, args, self.lora_graphs, self.lora_outputs, pool, fresh)
                finally:
                    self.lora.set_token_index(None)
        torch.cuda.synchronize()

    def _capture(self, bs, args, graphs, outputs, pool, fresh=None):
        if fresh is not None:
            fresh()
        self.model(*args)  # warm-up: compile kernels outside the capture
        torch.cuda.synchronize()
        if fresh is not None:
            fresh()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[bs] = self.model(*args)
        graphs[bs] = graph
        return graph.pool()

    def run(self, input_ids, positions, md: AttentionMetadata):
        """The decode step's hidden states, or None when no graph fits."""
        return self._replay(input_ids, positions, md, None)

    def run_lora(self, input_ids, positions, md: AttentionMetadata, lora_index):
        """The same for a step with LoRA rows; `lora_index`: each token's slot."""
        return self._replay(input_ids, positions, md, lora_index)

    def _replay(self, input_ids, positions, md: AttentionMetadata, lora_index):
        n = md.num_seqs
        if md.max_query_len != 1 or n > self.sizes[-1] or md.max_seq_len > self.max_seq_len:
            return None
        if lora_index is not None and not self.lora_graphs:
            return None
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(md.seq_lens)
        self.seq_lens[n:bs].fill_(1)
        self.block_table[:n, :md.block_table.shape[1]].copy_(md.block_table)
        self.block_table[n:bs, 0].fill_(0)
        if lora_index is not None:
            self.lora_index[:n].copy_(lora_index)
            self.lora_index[n:bs].fill_(0)
            self.lora_graphs[bs].replay()
            return self.lora_outputs[bs][:n]
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
