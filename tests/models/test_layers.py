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
