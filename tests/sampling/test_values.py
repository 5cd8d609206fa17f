import pytest
import torch

from argen.models.interface import Prediction
from argen.sampling.config import SamplerConfig
from argen.sampling.values import LogitValues, StepRows


def _rows(logits: torch.Tensor, steps: list[int], scales: torch.Tensor | None = None) -> StepRows:
    B = len(steps)
    positions = torch.zeros(B, logits.shape[1], dtype=torch.long)
    return StepRows(
        Prediction(positions, logits),
        torch.zeros(B, 4, dtype=torch.long),
        torch.zeros(B, 4, dtype=bool),
        scales,
        steps,
        8,
    )


def test_a_scale_of_one_draws_from_the_conditional_logits_and_guidance_moves_the_others():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    config = SamplerConfig(temperature=1.0, top_k=0, top_p=1.0)
    drawn = LogitValues.draw(
        None,
        _rows(torch.cat([cond, uncond]), [1, 4], torch.tensor([1.0, 3.0])),
        config,
        None,
        [torch.Generator().manual_seed(s) for s in (0, 1)],
    )
    assert drawn.values.shape == (2, 3)
    assert torch.equal(drawn.logits[0], cond[0])  # bit for bit at s = 1
    assert torch.allclose(drawn.logits[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), atol=1e-5)


@pytest.mark.parametrize(("steps", "where"), [([3, 3], "step 3"), ([5, 2, 4], "steps 2..5")])
def test_non_finite_logits_name_every_sample_s_step(steps, where):
    logits = torch.randn(len(steps), 2, 10)
    logits[-1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"non-finite.*{where}|{where}.*non-finite"):
        LogitValues.draw(None, _rows(logits, steps), SamplerConfig(), None, None)
