import pytest
import torch

from argen.models.scale_cache import ScaleKVCache


def test_entries_grow_per_layer_and_peak_is_tracked():
    cache = ScaleKVCache(num_layers=2)
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.update(0, k, k + 1)
    assert keys.shape == (1, 2, 3, 4) and cache.size() == 3
    keys, _ = cache.update(0, k[:, :, :2], k[:, :, :2])
    assert torch.equal(keys[:, :, :3], k) and keys.shape[2] == 5
    cache.update(1, k, k)
    assert cache.size() == 8 and cache.peak == 8


def test_compress_keeps_the_most_attended_entries_in_order_and_spares_drafters():
    torch.manual_seed(0)
    cache = ScaleKVCache(num_layers=2, budget=3, drafters=1)
    S, hd = 8, 4
    keys = torch.randn(2, 1, S, hd)
    for layer in range(2):
        cache.update(layer, keys, keys * 2)
    # layer 0: one query that looks at entries 1, 5, 6 only; layer 1: uniform attention (the widest: drafter)
    q_sharp = torch.zeros(2, 1, 1, hd)
    cache.observe(0, q_sharp, keys, 1.0)
    cache._scores[0] = torch.tensor([[0, 5, 0, 0, 0, 9, 7, 0], [8, 0, 0, 9, 0, 0, 0, 7]]).float()
    cache._spread[0] = 0.1
    cache.observe(1, q_sharp, keys, 1.0)  # all-zero query: uniform attention, spread 1
    assert cache._spread[1] == pytest.approx(1.0)
    cache.compress()
    assert cache.drafters == {1}
    assert torch.equal(cache.keys[0][0, 0], keys[0, 0, [1, 5, 6]])  # row 0 keeps 1, 5, 6 in their order
    assert torch.equal(cache.keys[0][1, 0], keys[1, 0, [0, 3, 7]])
    assert torch.equal(cache.values[0][0, 0], 2 * keys[0, 0, [1, 5, 6]])
    assert cache.keys[1].shape[2] == S  # the drafter keeps everything


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="kv_budget"):
        ScaleKVCache(2, budget=-1)
    with pytest.raises(ValueError, match="kv_drafters"):
        ScaleKVCache(2, budget=4, drafters=3)
