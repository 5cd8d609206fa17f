import pytest
import torch

from argen.models import layers
from argen.models.kv_cache import KV_BLOCK
from argen.models.layers import attention


@pytest.mark.parametrize("T, S", [(1, 40), (1, 1), (7, 30)])
def test_cpu_low_precision_inference_takes_the_explicit_path_and_agrees_with_the_fused_kernel(T, S, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (T, S, S))
    mask = torch.rand(T, S, generator=g) < 0.7
    mask[:, 0] = True  # every query sees at least one key
    exact = attention(q.double(), k.double(), v.double(), mask, use_sdpa=False)
    with torch.no_grad():
        assert layers._explicit_is_faster(q.bfloat16(), T, S)
        explicit = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        monkeypatch.setattr(layers, "CPU_LOW_PRECISION_EXPLICIT", 0)  # force the fused kernel
        fused = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert explicit.dtype == torch.bfloat16
    assert torch.allclose(explicit.double(), exact, atol=3e-2) and torch.allclose(fused.double(), exact, atol=3e-2)


def test_float32_and_training_keep_the_fused_kernel():
    q = torch.zeros(1, 1, 1, 8)
    assert not layers._explicit_is_faster(q, 1, 1)  # float32: the fused kernel, bit for bit as before
    assert not layers._explicit_is_faster(q.bfloat16(), 1, 1)  # grad enabled: training
    with torch.no_grad():
        big = torch.zeros(1, 1, 512, 8, dtype=torch.bfloat16)
        assert not layers._explicit_is_faster(big, 512, 512)  # a large score matrix: fused is faster


@pytest.mark.parametrize("B, H, L, hd", [(4, 3, 256, 64), (16, 12, 256, 64), (40, 6, 49, 32), (2, 6, 256, 32)])
def test_the_explicit_path_rounds_the_same_without_the_keys_no_query_sees(B, H, L, hd):
    """What lets a KV-cached decode step read only the cache's blocks up to its furthest row
    (`fewest_exact_keys`, `KVCache.block_length`): keys after the last one any query may attend change no bit of
    the output when the rest is cut to a multiple of 32 keys (at least `fewest_exact_keys`), for every count of keys in
    use up to 256 (GPT-B's head dim and length, its 16 guided rows x 12 heads; the shipped MNIST model's, 20 guided
    images), in bfloat16. Cutting to the exact count is not safe: at 8, 13 or 15 keys some draws round
    differently, and on an AVX-512 CPU at 32 (the last shape here, at 2 rows x 6 heads)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.arange(L)
    with torch.no_grad():
        for T in (1, 4):
            fewest = layers.fewest_exact_keys(torch.zeros((), dtype=torch.bfloat16), T, L)
            assert fewest == min(L, 64)  # bfloat16 inference: the cut is allowed
            k, v = (torch.randn(B, H, L, hd, generator=g).bfloat16() for _ in range(2))
            for n in range(T, L + 1, 1 if T == 1 else 9):
                q = torch.randn(B, H, T, hd, generator=g).bfloat16()
                seen = keys[None, :] <= torch.arange(n - T, n)[:, None]  # (T, L) causal: the last key seen is n - 1
                kept = min(L, max(fewest, -(-n // KV_BLOCK) * KV_BLOCK))
                whole = attention(q, k, v, seen)
                cut = attention(q, k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous(), seen[:, :kept])
                assert torch.equal(whole, cut), (T, n)


def test_float32_float16_and_training_keep_a_fixed_number_of_keys():
    x = torch.zeros(1, 8)
    assert layers.fewest_exact_keys(x, 1, 256) == 256  # its kernels round differently by length
    with torch.no_grad():
        assert layers.fewest_exact_keys(x.half(), 1, 256) == 256  # so do float16's products
    assert layers.fewest_exact_keys(x.bfloat16(), 1, 256) == 256  # grad enabled: training
    with torch.no_grad():
        assert layers.fewest_exact_keys(x.bfloat16(), 1, 256) == 64
        assert layers.fewest_exact_keys(x.bfloat16(), 1, 40) == 40  # never more than there are
        assert layers.fewest_exact_keys(x.bfloat16(), 1024, 1024) == 1024  # the fused kernel's size


def test_replace_randomly_replaces_at_the_rate_within_the_vocabulary():
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (200, 50))
    assert layers.replace_randomly(tokens, 0.0, 1000) is tokens
    out = layers.replace_randomly(tokens, 0.3, 1000)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    changed = (out != tokens).float().mean().item()
    assert abs(changed - 0.3 * 999 / 1000) < 0.01  # a replacement equal to the original by chance is unchanged
    assert out.min() >= 0 and out.max() < 1000
    assert len(torch.unique(out[out != tokens])) > 900  # uniform over the codes, not a fixed one
    everything = layers.replace_randomly(tokens, 1.0, 7)
    assert everything.max() < 7


@pytest.mark.parametrize("shape", [(192, 576), (192, 512), (512, 192), (16, 128)])
def test_linear_gives_a_row_the_same_values_in_any_number_of_rows(shape):
    """BLAS computes a product of very few rows with other kernels (on an AVX-512 CPU under 16 rows at 512
    inputs): `Linear` pads those in inference, so a row's values are the same alone as beside any others."""
    torch.manual_seed(0)
    layer = layers.Linear(*shape)
    x = torch.randn(40, shape[0])
    with torch.no_grad():
        full = layer(x)
        for rows in range(1, 40):
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
        assert torch.equal(layer(x[None, :3]), full[None, :3])  # leading dims: rows are all but the last
        assert layer(torch.zeros(0, shape[0])).shape == (0, shape[1])
    bias = torch.randn(shape[1])
    with torch.no_grad():
        assert torch.equal(layer(x[:2], bias), torch.nn.functional.linear(x, layer.weight, bias)[:2])
    out = layer(x[:2].requires_grad_())  # training: the plain product, gradients flow
    assert torch.equal(out, torch.nn.functional.linear(x[:2], layer.weight, layer.bias))
    out.sum().backward()
    assert layer.weight.grad is not None and set(layer.state_dict()) == {"weight", "bias"}


def test_scrambled_probe_values_fill_minus_one_to_one_the_same_across_chunks():
    x = layers.scrambled((2**20 + 3,), 5)  # one value past the first chunk of a million
    t = torch.arange(2**20 - 2, 2**20 + 3, dtype=torch.float64) + 7919 * 5
    u = torch.sin(t * 12.9898 + 78.233) * 43758.5453
    assert torch.equal(x[-5:], ((u - u.floor()) * 2 - 1).float())
    assert -1 <= x.min() and x.max() < 1 and abs(x.mean()) < 0.01 and x.std() > 0.5
    assert torch.equal(layers.scrambled((4, 6), 5), layers.scrambled((24,), 5).view(4, 6))  # no RNG


def test_padded_rows_reports_each_measured_shape_and_is_a_copy():
    layer = layers.Linear(24, 40)
    with torch.no_grad():
        layer(torch.randn(3, 24))
    measured = {key: rows for key, rows in layers.padded_rows().items() if key[1:4] == (40, True, 24)}
    assert len(measured) == 1 and 1 <= next(iter(measured.values())) <= layers.PROBE_ROWS
    layers.padded_rows().clear()  # the caller's dict, not the cache
    assert layers.padded_rows().keys() >= measured.keys()


def test_linear_probes_its_shape_on_scrambled_weights_not_its_own(monkeypatch):
    """A zero-initialised layer (DiT's gates) multiplies exactly with any kernel: if it set the threshold of its
    shape, the next layer of that shape would not be padded."""
    monkeypatch.setattr(layers, "_invariant_rows", {})  # no earlier test's measurement: the zero layer probes
    zero = layers.Linear(512, 136)
    torch.nn.init.zeros_(zero.weight)
    torch.nn.init.zeros_(zero.bias)
    x = torch.randn(40, 512)
    with torch.no_grad():
        assert not zero(x[:1]).any()  # the first of its shape: it probes
        (threshold,) = layers.padded_rows().values()
        if threshold == 1:
            pytest.skip("this CPU multiplies 512 -> 136 alike at every row count: nothing to get wrong")
        layer = layers.Linear(512, 136)
        full = layer(x)
        for rows in range(1, 40):
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
