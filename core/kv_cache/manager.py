"""Per-request block tables on top of the block pool, with automatic prefix caching."""
from __future__ import annotations

from dataclasses import dataclass

from pageport.core.kv_cache.block_pool import Block, BlockPool
from pageport.core.request import Request


def hash_block(parent: int | None, tokens: tuple[int, ...], extra: object = None) -> int:
    """Chained hash: a block's identity is its tokens and everything before it."""
    return hash((parent, tokens, extra))


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.req_blocks: dict[str, list[Block]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many of a request's blocks are hashed
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    def usage(self) -> float:
        return self.pool.usage()

    def _update_hashes(self, req: Request) -> None:
        bs, hashes = self.block_size, req.block_hashes
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(req.token_ids[i * bs:(i + 1) * bs]), req.cache_salt))

    def get_computed_blocks(self, req: Request) -> tuple[list[Block], int]:
        """Longest run of cached full blocks that prefixes the request's tokens.

        Never covers the last token: its logits are needed to sample the next one.
        """
        if not self.enable_caching or req.params.prompt_logprobs is not None:
            return [], 0
        self._update_hashes(req)
        hits: list[Block] = []
        for h in req.block_hashes[: (req.num_tokens - 1) // self.block_size]:
            block = self.pool.get_cached(h)
            if block is None:
                break
            hits.append(block)
        self.stats.queries += req.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        """Make room for num_new_tokens more tokens after the computed ones; False if blocks ran out."""
        blocks = self.req_blocks.get(req.request_id)
        bs = self.block_size
        if blocks is None:
            blocks = self.req_blocks[req.request_id] = []
        elif not computed:  # the common decode step: room in the last block, no block newly full
            num_tokens = req.num_computed_tokens + num_new_tokens
            if num_tokens <= len(blocks) * bs and (not self.enable_caching or min(num_tokens, len(req.token_ids))
                                                   // bs <= self.num_cached_blocks.get(req.request_id, 0)):
                return True
        num_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        need = -(-num_tokens // self.block_size) - len(blocks) - len(computed)
        revived = sum(1 for b in computed if b.ref_cnt == 0)  # hits that are sitting in the free queue
        if need > self.pool.num_free - revived:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        self.pool.touch(computed)
        blocks.extend(computed)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        if self.enable_caching:
            self._cache_full_blocks(req, blocks, num_tokens)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[Block], num_tokens: int) -> None:
        """Publish blocks that will be full once this step's tokens are computed."""
        done = self.num_cached_blocks.get(req.request_id, 0)
        full = min(num_tokens, req.num_tokens) // self.block_size
        if full <= done:
            return
        self._update_hashes(req)
        for i in range(done, full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        self.num_cached_blocks[req.request_id] = full

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.num_cached_blocks.pop(req.request_id, None)
        self.pool.free(reversed(blocks))

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, ())]

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
