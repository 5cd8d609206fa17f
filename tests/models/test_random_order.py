"""The random-order generator (RandAR): its cache-decoding equals teacher forcing along the same permutation, its
mask hides queries and a query's own token, and parallel steps fill the image in the requested passes."""

from __future__ import annotations

import copy

import pytest
import torch

from argen.errors import ConfigError
from argen.models.interface import Condition
from argen.models.random_order import (
    RandomOrderConfig,
    RandomOrderOptions,
    RandomOrderTransformer,
    teacher_forcing_mask,
)
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import decode_steps, generate, seeded_generators
from argen.sampling.logits import draw


def tiny_random_order(**overrides) -> RandomOrderTransformer:
    """A seeded random-order generator small enough for unit tests (L = 9)."""
    fields = dict(vocab_size=32, num_classes=3, grid_size=3, dim=32, num_layers=2, num_heads=4, multiple_of=16)
    torch.manual_seed(0)
    return RandomOrderTransformer(RandomOrderConfig(**{**fields, **overrides})).eval()


def _sharp(**overrides) -> RandomOrderTransformer:
    """Weights scaled up so that attention is far from uniform and a wrong slot or mask would show."""
    model = tiny_random_order(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _permutations(B: int, L: int, seed: int) -> torch.Tensor:
    return torch.rand(B, L, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)


@pytest.mark.parametrize("kv_heads", [None, 2])
@torch.no_grad()
def test_one_token_per_step_equals_teacher_forcing_along_the_same_permutation(kv_heads):
    model = _sharp(num_kv_heads=kv_heads)
    L = model.seq_len
    tokens = torch.randint(0, model.vocab_size, (3, L), generator=torch.Generator().manual_seed(0))
    condition = Condition.classes([0, 2, 1])
    order = _permutations(3, L, seed=1)  # a different permutation per row: per-row slots in one cache
    full = model(tokens, condition, order)  # (B, L, V)
    state, rows = model.start(condition), []
    while not state.done:
        positions = order[:, state.step : state.step + 1]
        rows.append(model.predict(state, positions).logits)
        model.advance(state, positions, tokens.gather(1, positions))
    torch.testing.assert_close(torch.cat(rows, dim=1), full, atol=1e-4, rtol=1e-4)
    assert state.filled.all() and torch.equal(state.tokens, tokens)
    # and the loss is that likelihood along its own (random) permutation
    torch.manual_seed(5)
    out = model.loss(tokens, condition)
    torch.manual_seed(5)
    drawn = torch.rand(tokens.shape).argsort(dim=1)
    logp = model(tokens, condition, drawn).log_softmax(-1).gather(-1, tokens.gather(1, drawn)[..., None])
    assert out.num_targets == tokens.numel()
    assert out.nll_sum.item() == pytest.approx(-logp.sum().item(), rel=1e-5)


@torch.no_grad()
def test_the_raster_order_reproduces_a_raster_order_run():
    """order="raster" samples along the identity: the same ids as a hand-written loop over positions 0..L-1 that
    draws from the same generators, and greedy sampling picks the argmax of teacher forcing along the identity."""
    model = _sharp()
    L, classes, seeds = model.seq_len, [0, 1, 2], [4, 5, 6]
    config = SamplerConfig(order_options={"order": "raster"})
    sampled = generate(model, Condition.classes(classes), config, seeded_generators(seeds))
    generators = seeded_generators(seeds)
    state = model.start(Condition.classes(classes))
    for p in range(L):
        positions = torch.full((3, 1), p)
        values = draw(model.predict(state, positions).logits, generators)
        model.advance(state, positions, values)
    assert torch.equal(sampled, state.tokens)
    greedy = generate(model, Condition.classes(classes), SamplerConfig(greedy=True, order_options={"order": "raster"}))
    identity = torch.arange(L)
    assert torch.equal(model(greedy, Condition.classes(classes), identity).argmax(-1), greedy)


class _CountingModel:
    """Counts forward passes (predict calls) of the wrapped model."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict(self, state, positions=None):
        self.calls += 1
        return self.model.predict(state, positions)


@pytest.mark.parametrize("steps", [1, 4, 9])
@torch.no_grad()
def test_parallel_steps_fill_every_position_in_exactly_that_many_passes(steps):
    model = _CountingModel(_sharp())
    config = SamplerConfig(cfg_scale=2.0, order_options={"steps": steps})
    frames = list(decode_steps(model, Condition.classes([0, 1]), config, seeded_generators([0, 1])))
    assert len(frames) == steps == model.calls
    committed = torch.cat([f.positions for f in frames], dim=1)  # (B, L): each position exactly once
    assert torch.equal(committed.sort(dim=1).values, torch.arange(model.seq_len).expand(2, -1))
    assert frames[-1].filled.all()


@torch.no_grad()
def test_the_queries_of_one_pass_do_not_see_each_other():
    """RandAR's parallel decoding: three queries in one pass give the logits each gives alone, from any row's
    own state (rows hold different permutations and different numbers of uncached tokens)."""
    model = _sharp()
    L = model.seq_len
    order = _permutations(2, L, seed=3)
    tokens = torch.randint(0, model.vocab_size, (2, L), generator=torch.Generator().manual_seed(3))
    state = model.start(Condition.classes([1, 2]))
    model.predict(state, order[:, :1])
    model.advance(state, order[:, :2], tokens.gather(1, order[:, :2]))
    queries = order[:, 2:5]
    together = model.predict(copy.deepcopy(state), queries).logits
    alone = torch.cat([model.predict(copy.deepcopy(state), queries[:, j : j + 1]).logits for j in range(3)], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_the_mask_hides_every_query_and_a_querys_own_token():
    L = 5
    mask = teacher_forcing_mask(L)  # rows attend to columns; entries [cls, q1, t1, ..., t4, q5]
    queries, tokens = torch.arange(1, 2 * L, 2), torch.arange(2, 2 * L, 2)
    assert not mask[:, queries].any()  # nobody, queries included, attends to a query
    for k in range(1, L + 1):
        q = 2 * k - 1
        assert torch.equal(mask[q].nonzero().flatten(), torch.cat([torch.tensor([0]), tokens[: k - 1]]))
    for k in range(1, L):
        t = 2 * k
        assert torch.equal(mask[t].nonzero().flatten(), torch.cat([torch.tensor([0]), tokens[:k]]))


@torch.no_grad()
def test_a_querys_logits_depend_on_earlier_tokens_only():
    model = _sharp()
    L, k = model.seq_len, 4
    order = _permutations(1, L, seed=7)
    tokens = torch.randint(0, model.vocab_size, (1, L), generator=torch.Generator().manual_seed(7))
    changed = tokens.clone()
    changed[0, order[0, k]] = (tokens[0, order[0, k]] + 1) % model.vocab_size  # the token the k-th query predicts
    a, b = model(tokens, [0], order), model(changed, [0], order)
    torch.testing.assert_close(a[:, : k + 1], b[:, : k + 1])  # queries up to its own never see it
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :])  # later queries do


def test_invalid_configs_options_and_inputs_are_named():
    with pytest.raises(ConfigError, match="num_heads"):
        RandomOrderConfig(dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="class_dropout"):
        RandomOrderConfig(class_dropout=1.5)
    with pytest.raises(ConfigError, match="steps"):
        RandomOrderOptions(steps=0)
    with pytest.raises(ConfigError, match="order"):
        RandomOrderOptions(order="spiral")
    model = tiny_random_order()
    with pytest.raises(ConfigError, match="steps=10"):
        model.start([0], RandomOrderOptions(steps=10))
    state = model.start([0])
    with pytest.raises(ValueError, match="no positions of its own"):
        model.predict(state)
    with pytest.raises(ValueError, match="permutation"):
        model(torch.zeros(1, 9, dtype=torch.long), [0], torch.zeros(9, dtype=torch.long))


def test_a_query_at_a_filled_position_sees_only_what_was_committed_before_it():
    """Teacher forcing along the commit order inside decoding (what speculative verification reads): asking for a
    committed position gives the logits it had before it was committed, whatever came after it."""
    model = tiny_random_order()
    state = model.start([1])
    before = model.predict(state, torch.tensor([[3, 5]])).logits  # first pass: cls only
    model.advance(state, torch.tensor([[3]]), torch.tensor([[7]]))
    between = model.predict(state, torch.tensor([[5]])).logits  # sees token 7 at position 3
    model.advance(state, torch.tensor([[5, 0]]), torch.tensor([[2, 4]]))
    again = model.predict(state, torch.tensor([[3, 5, 1]])).logits
    torch.testing.assert_close(again[:, 0], before[:, 0], rtol=1e-5, atol=1e-5)  # rank 0: cls only
    torch.testing.assert_close(again[:, 1], between[:, 0], rtol=1e-5, atol=1e-5)  # rank 1: cls + position 3
    assert not torch.allclose(again[:, 2], between[:, 0], atol=1e-3)  # unfilled: sees all three


def test_the_cache_notices_a_rewritten_token():
    """A sampler that rewrites a committed token (a draft it did not accept) gets logits as if the new token had
    been committed all along: the stale cache entry and everything above it are recomputed."""
    model = tiny_random_order()
    fresh = model.start([0])
    model.advance(fresh, torch.tensor([[4, 2]]), torch.tensor([[9, 3]]))
    want = model.predict(fresh, torch.tensor([[6]])).logits
    state = model.start([0])
    model.advance(state, torch.tensor([[4, 2]]), torch.tensor([[1, 3]]))
    model.predict(state, torch.tensor([[6]]))  # caches tokens 1 and 3
    state.tokens[0, 4] = 9  # rewrite the first, keep the rank
    torch.testing.assert_close(model.predict(state, torch.tensor([[6]])).logits, want, rtol=1e-5, atol=1e-5)
