import pytest

from pageport.core.kv_cache import BlockPool, FreeBlockQueue, KVCacheManager, hash_block
from pageport.core.kv_cache.block_pool import Block
from pageport.core.request import Request
from pageport.core.sampling_params import SamplingParams


def make_req(rid, tokens, **kw):
    return Request(rid, tokens, SamplingParams(**kw), eos_token_id=None)


def test_free_queue_is_lru_and_removes_from_the_middle():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2]
    assert q.num_free == 4


def test_pool_reserves_null_block_and_counts_refs():
    pool = BlockPool(4)
    got = pool.allocate(3)
    assert 0 not in [b.block_id for b in got]
    assert pool.num_free == 0 and pool.usage() == 1.0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.touch([got[0]])
    pool.free(got)
    assert pool.num_free == 2 and got[0].ref_cnt == 1
    pool.free([got[0]])
    assert pool.num_free == 3


def test_allocation_grows_block_by_block_and_all_blocks_return():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = make_req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert len(kv.block_ids(r)) == 3
    r.num_computed_tokens = 10
    r.append_token(99)
    assert kv.allocate_slots(r, 1)  # 11 tokens still fit in 3 blocks
    assert len(kv.block_ids(r)) == 3
    r.num_computed_tokens = 11
    for t in range(2):
        r.append_token(t)
    assert kv.allocate_slots(r, 2)  # 13 tokens: a 4th block
    assert len(kv.block_ids(r)) == 4
    kv.free(r)
    assert kv.pool.num_free == 9


def test_allocation_fails_cleanly_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r = make_req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.pool.num_free == 2 and "a" not in kv.req_blocks


def test_prefix_hits_follow_the_hash_chain_and_never_cover_the_last_token():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = make_req("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    kv.free(a)  # blocks stay cached in the free queue
    b = make_req("b", list(range(12)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8  # 3 full blocks cached, but the last token must be recomputed
    assert [x.block_id for x in hits] == kv_ids_of_first(kv, a, 2, b)
    c = make_req("c", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    hits, n = kv.get_computed_blocks(c)
    assert n == 4  # the chain breaks at block 2 even though block 3's tokens match
    assert kv.stats.hits == 12 and kv.stats.queries == 25


def kv_ids_of_first(kv, a, n, b):
    return [kv.pool.cached[h].block_id for h in b.block_hashes[:n]]


def test_shared_blocks_are_ref_counted_and_survive_one_owner_freeing():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = make_req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    b = make_req("b", list(range(9)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    assert kv.allocate_slots(b, 1, hits)
    shared = kv.req_blocks["a"][:2]
    assert kv.req_blocks["b"][:2] == shared and all(x.ref_cnt == 2 for x in shared)
    kv.free(a)
    assert all(x.ref_cnt == 1 for x in shared)
    kv.free(b)
    assert kv.pool.num_free == 19


def test_eviction_drops_the_hash_and_disabled_caching_never_hits():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_req("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(a, 4)
    kv.free(a)
    b = make_req("b", [7, 8, 9, 10, 11])
    assert kv.allocate_slots(b, 4)  # reuses (evicts) both cached blocks
    assert kv.get_computed_blocks(make_req("c", [1, 2, 3, 4, 5]))[1] == 0
    off = KVCacheManager(num_blocks=10, block_size=2, enable_caching=False)
    d = make_req("d", [1, 2, 3, 4, 5])
    assert off.allocate_slots(d, 5)
    off.free(d)
    assert off.get_computed_blocks(make_req("e", [1, 2, 3, 4, 5])) == ([], 0)


def test_hash_depends_on_parent_tokens_and_salt():
    h = hash_block(None, (1, 2))
    assert h != hash_block(None, (1, 3))
    assert hash_block(h, (5, 6)) != hash_block(hash_block(None, (9, 9)), (5, 6))
    assert hash_block(None, (1, 2), "salt") != h
