"""CUDA graphs for decode and verifying steps: captured once per batch size, replayed with padded inputs.

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


def verify_query_len(config) -> int:
    """Query tokens a row reads in a verifying step (1 + proposals); 1 without speculative decoding."""
    spec = getattr(config, "speculative_config", None)
    return 1 + spec["num_speculative_tokens"] if spec else 1


class CudaGraphRunner(GraphRunner):
    """Steps whose rows read at most q query tokens each, up to the largest captured batch: q = 1 (decode) and,
    with speculative decoding, q = 1 + k (verifying). A graph holds bs rows and bs * q token slots; a step's
    tokens fill them from the start, ragged as the step has them, the other rows are empty (q_len 0) and the
    token slots past the step's tokens belong to no row: they write slot -1 (skipped) and their outputs, never
    read, do not mix with other tokens' (every op but attention works token by token).

    With LoRA each decode size is captured twice: without adapters (steps of base rows only pay nothing) and with
    every slot live, the tokens' slots read from a static buffer (padding tokens: slot 0).
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], config):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(config.max_num_seqs)
        self.query_lens = sorted({1, verify_query_len(config)})
        self.block_size = config.block_size
        self.max_seq_len = config.max_model_len
        n, dev = self.sizes[-1], kv_caches[0].device
        t = n * self.query_lens[-1]
        self.input_ids = torch.zeros(t, dtype=torch.long, device=dev)
        self.positions = torch.zeros(t, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(n, math.ceil(self.max_seq_len / self.block_size), dtype=torch.int32,
                                       device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, q) -> graph
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.lora = getattr(model, "lora", None)  # models/lora LoRAModel
        self.lora_index = torch.zeros(t, dtype=torch.long, device=dev)
        self.lora_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.lora_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.metadata: dict = {}  # keeps each graph's backend buffers (split-KV workspace) alive
        self.replays = dict.fromkeys(self.query_lens, 0)  # steps replayed, by q

    def _metadata(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=bs * q, query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs * q], max_query_len=q,
            max_seq_len=self.max_seq_len, query_start_loc_cpu=list(range(0, bs * q + 1, q)),
            seq_lens_cpu=[self.max_seq_len] * bs, block_size=self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for q in reversed(self.query_lens):
            for bs in tqdm(list(reversed(self.sizes)), desc=f"Capturing CUDA graphs (q={q})", leave=False):
                key = (bs, q)
                self.query_start_loc[:bs + 1] = torch.arange(0, bs * q + 1, q, dtype=torch.int32)
                md = self.metadata[key] = self.model.attn_backend.build_metadata(self._metadata(bs, q))
                args = (self.input_ids[:bs * q], self.positions[:bs * q], self.kv_caches, md)
                pool = self._capture(key, args, self.graphs, self.outputs, pool)
                if self.lora is not None and q == 1:
                    slots = list(range(1, self.lora.max_loras + 1))
                    # set again after the warm-up: a new index view, so that what the ops derive from the index
                    # once per step (the tokens sorted by slot) is computed inside the graph, not kept from the
                    # warm-up
                    fresh = lambda bs=bs: self.lora.set_token_index(self.lora_index[:bs], slots)  # noqa: E731
                    try:
                        pool = self._capture(key, args, self.lora_graphs, self.lora_outputs, pool, fresh)
                    finally:
                        self.lora.set_token_index(None)
        torch.cuda.synchronize()

    def _capture(self, key, args, graphs, outputs, pool, fresh=None):
        if fresh is not None:
            fresh()
        self.model(*args)  # warm-up: compile kernels outside the capture
        torch.cuda.synchronize()
        if fresh is not None:
            fresh()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[key] = self.model(*args)
        graphs[key] = graph
        return graph.pool()

    def run(self, input_ids, positions, md: AttentionMetadata):
        """The step's hidden states, or None when no graph fits."""
        return self._replay(input_ids, positions, md, None)

    def run_lora(self, input_ids, positions, md: AttentionMetadata, lora_index):
        """The same for a step with LoRA rows; `lora_index`: each token's slot."""
        return self._replay(input_ids, positions, md, lora_index)

    def _replay(self, input_ids, positions, md: AttentionMetadata, lora_index):
        n, t = md.num_seqs, md.num_actual_tokens
        q = next((x for x in self.query_lens if x >= md.max_query_len), None)
        if q is None or n > self.sizes[-1] or md.max_seq_len > self.max_seq_len:
            return None
        graphs, outputs = (self.graphs, self.outputs) if lora_index is None else (self.lora_graphs,
                                                                                    self.lora_outputs)
        bs = next(s for s in self.sizes if s >= n)
        if (bs, q) not in graphs:
            return None
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slot_mapping[:t].copy_(md.slot_mapping)
        self.slot_mapping[t:bs * q].fill_(-1)
        self.positions[t:bs * q].fill_(0)
        self.query_start_loc[:n + 1].copy_(md.query_start_loc)
        self.query_start_loc[n + 1:bs + 1].fill_(t)
        self.seq_lens[:n].copy_(md.seq_lens)
        self.seq_lens[n:bs].fill_(1)
        self.block_table[:n, :md.block_table.shape[1]].copy_(md.block_table)
        self.block_table[n:bs, 0].fill_(0)
        if lora_index is not None:
            self.lora_index[:t].copy_(lora_index)
            self.lora_index[t:bs * q].fill_(0)
        graphs[bs, q].replay()
        self.replays[q] += 1
        return outputs[bs, q][:t]
