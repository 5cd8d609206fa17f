import pytest
import torch

from argen.models import layers
from argen.models.layers import attention


@pytest.mark.parametrize("T, S", [(1, 40), (1, 1), (7, 30)])
def test_cpu_low_precision_inference_takes_the_explicit_path_and_agrees_with_the_fused_kernel(T, S, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (T, S, S))
    mask = torch.rand(T, S, generator=g) < 0.7
    mask[:, 0] = True  # every query sees at least one key
    exact = attention(q.double(), k.double(), v.double(), mask, use_sdpa=False)
    with torch.no_grad():
        assert layers._explicit_is_faster(q.bfloat16(), k.bfloat16())
        explicit = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        monkeypatch.setattr(layers, "CPU_LOW_PRECISION_EXPLICIT", 0)  # force the fused kernel
        fused = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert explicit.dtype == torch.bfloat16
    assert torch.allclose(explicit.double(), exact, atol=3e-2) and torch.allclose(fused.double(), exact, atol=3e-2)


def test_float32_and_training_keep_the_fused_kernel():
    q = torch.zeros(1, 1, 1, 8)
    assert not layers._explicit_is_faster(q, q)  # float32: the fused kernel, bit for bit as before
    assert not layers._explicit_is_faster(q.bfloat16(), q.bfloat16())  # grad enabled: training
    with torch.no_grad():
        big = torch.zeros(1, 1, 512, 8, dtype=torch.bfloat16)
        assert not layers._explicit_is_faster(big, big)  # a large score matrix: fused is faster


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


def _rows_at(ends, S=200, T=1):
    """A (B, 1, T, S) causal-style mask: row b sees keys 0..ends[b]-1."""
    keys = torch.arange(S)
    return (keys[None, :] < torch.tensor(ends)[:, None])[:, None, None, :].expand(-1, 1, T, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_reads_each_rows_keys_only_to_its_bucket_and_rows_keep_their_own_output(dtype):
    torch.manual_seed(0)
    ends = [3, 70, 64, 65, 200, 130]
    B, H, S, hd = len(ends), 2, 200, 16
    q, k, v = (
        torch.randn(B, H, 1, hd).to(dtype),
        torch.randn(B, H, S, hd).to(dtype),
        torch.randn(B, H, S, hd).to(dtype),
    )
    mask = _rows_at(ends, S)
    with torch.no_grad():
        trimmed = attention(q, k, v, mask)
    full = layers._attend(q, k, v, mask, None, True)  # every key read, the reference
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with torch.no_grad():
        for b, end in enumerate(ends):  # alone, a row reads its own bucket: the same bits as in the mixed batch
            alone = attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1])
            assert torch.equal(alone, trimmed[b : b + 1]), end
        # the cut really happens: keys past a row's bucket do not matter, keys inside it do
        k2 = k.clone()
        k2[0, :, layers.KEY_BUCKET :] = float("nan")
        assert torch.isfinite(attention(q[:1], k2[:1], v[:1], mask[:1])).all()
    k2[0, :, :3] = 0
    assert not torch.equal(
        layers._attend(q[:1], k2[:1, :, :64], v[:1, :, :64], mask[:1, ..., :64], None, True), trimmed[:1]
    )


def test_training_and_short_sequences_read_every_key():
    q, k = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 100, 8)
    mask = _rows_at([5, 5], 100)
    assert layers._trims_keys(q, k, mask, 0.0) is False  # autograd is on
    with torch.no_grad():
        assert layers._trims_keys(q, k, mask, 0.0)
        assert not layers._trims_keys(q, k[:, :, : layers.KEY_BUCKET], mask[..., : layers.KEY_BUCKET], 0.0)
        assert not layers._trims_keys(q, k, mask, 0.1)  # attention dropout
        assert not layers._trims_keys(q, k, None, 0.0)
