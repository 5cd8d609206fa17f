"""RandAR's position policy: per-sample permutations from the seeds, known positions first, the step schedule."""

from __future__ import annotations

import pytest
import torch

from argen.models.interface import Condition, DecodeState
from argen.sampling.guidance import with_null_rows
from argen.sampling.positions import KnownTokens
from argen.sampling.random_order import RandomOrderPolicy, tokens_per_step


class _Options:
    def __init__(self, order: str = "random"):
        self.order = order


def _orders(seeds, L=16, steps=None, order="random", known=None, condition=None, samples=None) -> torch.Tensor:
    """The (B, L) permutations the policy draws for these seeds (steps=None: one position per step)."""
    condition = condition or Condition.classes(list(range(len(seeds))))
    rows = len(condition)
    state = DecodeState(condition, torch.zeros(rows, L, dtype=torch.long), torch.zeros(rows, L, dtype=torch.bool))
    state.num_steps = steps or L
    generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
    samples = samples or (len(seeds) if seeds is not None else rows)
    policy = RandomOrderPolicy(None, _Options(order), samples, generators, known)
    policy.begin(state)
    steps_taken = []
    while not state.done:
        steps_taken.append(policy.positions(state))
        state.step += 1
    return torch.cat(steps_taken, dim=1)


def test_permutations_are_per_sample_and_deterministic_from_the_seed():
    batch = _orders([3, 4, 5])
    assert torch.equal(batch.sort(dim=1).values, torch.arange(16).expand(3, -1))  # each row a permutation
    assert torch.equal(batch[1:2], _orders([4]))  # the same alone as in a batch
    assert torch.equal(batch, _orders([3, 4, 5]))
    assert not torch.equal(batch[0], batch[1])


def test_known_positions_come_first():
    g = torch.Generator().manual_seed(0)
    known = torch.rand(3, 16, generator=g) < torch.tensor([[0.0], [0.3], [0.8]])
    orders = _orders([0, 1, 2], known=KnownTokens(torch.zeros(3, 16, dtype=torch.long), known))
    for b in range(3):
        k = int(known[b].sum())
        assert torch.equal(orders[b, :k].sort().values, known[b].nonzero().flatten())
    raster = _orders([0, 1, 2], order="raster", known=KnownTokens(torch.zeros(3, 16, dtype=torch.long), known))
    for b in range(3):  # raster: the known positions in raster order, then the rest in raster order
        assert torch.equal(raster[b], torch.cat([known[b].nonzero().flatten(), (~known[b]).nonzero().flatten()]))


def test_raster_is_the_identity_and_guided_rows_share_their_samples_positions():
    assert torch.equal(_orders([0, 1], order="raster"), torch.arange(16).expand(2, -1))
    guided = with_null_rows(Condition.classes([0, 1]))
    assert torch.equal(_orders([0, 1], condition=guided), _orders([0, 1]))  # (B, L) for 2B state rows
    assert _orders(None, condition=guided, samples=2).shape == (2, 16)  # no generators: B as the loop says


@pytest.mark.parametrize("steps", [1, 5, 20, 49])
def test_the_schedule_fills_every_position_once_with_a_growing_count(steps):
    counts = tokens_per_step(49, steps)
    assert len(counts) == steps and sum(counts) == 49 and min(counts) >= 1
    assert counts == sorted(counts)  # few tokens while the context is thin, more later
    assert _orders([0], L=49, steps=steps).shape == (1, 49)
    if steps == 49:
        assert counts == [1] * 49
