"""Test helpers: drive a model through paged attention the way the engine does, with hand-built metadata."""
from __future__ import annotations

import torch

from pageport.platforms import AttentionMetadata


def make_metadata(seqs: list[tuple[int, int, list[int]]], block_size: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """seqs: (tokens already cached, tokens this step, block ids) per sequence.

    Returns the metadata (slot = block_id * block_size + offset) and the positions of this step's tokens.
    """
    starts, seq_lens, positions, slots = [0], [], [], []
    for cached, new, blocks in seqs:
        seq_len = cached + new
        assert len(blocks) * block_size >= seq_len, "not enough blocks for the sequence"
        starts.append(starts[-1] + new)
        seq_lens.append(seq_len)
        for pos in range(cached, seq_len):
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    max_blocks = max(len(b) for _, _, b in seqs)
    table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for i, (_, _, blocks) in enumerate(seqs):
        table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(s[1] for s in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    return md, torch.tensor(positions, dtype=torch.long)


class PagedRunner:
    """Owns a KV cache and per-sequence block tables; blocks are handed out in a scrambled order
    so a sequence's blocks are neither contiguous nor ascending."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0):
        self.model, self.block_size = model, block_size
        dtype = next(model.parameters()).dtype
        shape = model.attn_backend.kv_cache_shape(num_blocks, block_size, model.num_kv_heads, model.head_size)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict = {}
        self.cached: dict = {}

    @torch.no_grad()
    def step(self, batch: list[tuple[object, list[int]]]) -> list[torch.Tensor]:
        """batch: (sequence key, this step's token ids). Returns float32 logits [len(ids), vocab] per entry."""
        seqs, ids = [], []
        for key, toks in batch:
            cached = self.cached.get(key, 0)
            table = self.tables.setdefault(key, [])
            while len(table) * self.block_size < cached + len(toks):
                table.append(self.free.pop())
            seqs.append((cached, len(toks), list(table)))
            ids += toks
            self.cached[key] = cached + len(toks)
        md, positions = make_metadata(seqs, self.block_size)
        hidden = self.model(torch.tensor(ids, dtype=torch.long), positions, self.kv_caches, md)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(t) for _, t in batch]))
