from pageport.core.kv_cache.block_pool import Block, BlockPool, FreeBlockQueue
from pageport.core.kv_cache.manager import KVCacheManager, PrefixCacheStats, hash_block

__all__ = ["Block", "BlockPool", "FreeBlockQueue", "KVCacheManager", "PrefixCacheStats", "hash_block"]
