import torch

from argen.models.kv_cache import KV_BLOCK, KVCache


def test_the_cache_grows_in_blocks_and_keeps_its_entries():
    g = torch.Generator().manual_seed(0)
    cache = KVCache(num_layers=2, batch=3, num_heads=2, head_dim=4, max_len=70, like=torch.zeros(()))
    written = torch.zeros(3, 2, 70, 4)
    for p in range(70):
        k = torch.randn(3, 2, 1, 4, generator=g)
        written[:, :, p : p + 1] = k
        length = cache.block_length(p + 1)
        keys, values = cache.update_rows(0, k, -k, torch.full((3, 1), p), length)
        assert length == min(70, (p // KV_BLOCK + 1) * KV_BLOCK)
        # the whole buffer, one dense block: what the batched matmul reads without a copy
        assert keys.shape == (3, 2, length, 4) and keys.is_contiguous() and values.is_contiguous()
        assert torch.equal(keys[:, :, : p + 1], written[:, :, : p + 1]) and torch.equal(values, -keys)
        assert not keys[:, :, p + 1 :].any()  # nothing written there yet
    assert cache.keys[1].shape[2] == 0  # layer 1 was never written: no memory taken


def test_caches_of_different_capacities_concatenate():
    a = KVCache(1, 2, 1, 4, max_len=100, like=torch.zeros(()))
    b = KVCache(1, 1, 1, 4, max_len=100, like=torch.zeros(()))
    a.update(0, torch.ones(2, 1, 40, 4), torch.ones(2, 1, 40, 4), start=0)  # grows to 64
    b.update(0, torch.full((1, 1, 3, 4), 2.0), torch.full((1, 1, 3, 4), 2.0), start=0)  # grows to 32
    both = KVCache.cat([a, b])
    assert both.keys[0].shape == (3, 1, 64, 4)
    assert torch.equal(both.keys[0][:2], a.keys[0]) and both.keys[0][2, :, :3].eq(2).all()
    assert not both.keys[0][2, :, 3:].any()
    assert torch.equal(both.take(torch.tensor([2])).keys[0][0, :, :32], b.keys[0][0])
