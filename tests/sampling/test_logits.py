import math

import pytest
import torch

from argen.sampling.logits import check_finite, draw, process, top_k_filter, top_p_filter


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 5.0, 0.0])
    assert kept(top_k_filter(logits, 3)) == {1, 3, 4}
    assert kept(top_k_filter(logits, 1)) == {4}
    assert kept(top_k_filter(logits, 0)) == set(range(6))
    assert kept(top_k_filter(logits, 100)) == set(range(6))  # clamped to the vocabulary


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([0.5, 0.05, 0.3, 0.15])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == {0}
    assert kept(top_p_filter(logits, 0.51)) == {0, 2}
    assert kept(top_p_filter(logits, 0.8)) == {0, 2}
    assert kept(top_p_filter(logits, 0.81)) == {0, 2, 3}
    assert kept(top_p_filter(logits, 0.01)) == {0}  # the most likely token always survives
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)


def test_temperature_scales_and_rejects_negative():
    logits = torch.tensor([[[1.0, 2.0]]])
    assert torch.allclose(process(logits, temperature=0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        process(logits, temperature=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_logits_raise_wherever_they_are(bad, dtype):
    check_finite(torch.randn(3, 1, 1000).to(dtype))
    check_finite(torch.randn(3, 0, 1000).to(dtype))  # no position asked this step
    for where in (0, 517, 2999):  # first, inside a vector, last
        logits = torch.randn(3, 1, 1000).to(dtype)
        logits.view(-1)[where] = bad
        with pytest.raises(ValueError, match="1 non-finite"):
            check_finite(logits)


def test_draw_follows_the_distribution_and_is_per_sample():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(1, 20000, 3).contiguous()
    ids = draw(logits, [torch.Generator().manual_seed(1)])
    freq = torch.bincount(ids.flatten(), minlength=3).float() / ids.numel()
    # 3 standard deviations of a binomial proportion at n = 20000
    assert torch.all((freq - probs).abs() < 3 * (probs * (1 - probs) / 20000).sqrt())
    # Row b depends only on generators[b]
    two = draw(
        probs.log().expand(2, 50, 3).contiguous(),
        [torch.Generator().manual_seed(7)] * 1 + [torch.Generator().manual_seed(9)],
    )
    one = draw(probs.log().expand(1, 50, 3).contiguous(), [torch.Generator().manual_seed(9)])
    assert torch.equal(two[1], one[0])
    # filtered tokens are never drawn
    masked = torch.tensor([[[0.0, -math.inf, 0.0]]]).expand(1, 500, 3).contiguous()
    assert (draw(masked, [torch.Generator().manual_seed(0)]) != 1).all()
