"""Speculative decoding must sample exactly the plain sampler's distribution (and its greedy ids)."""

import itertools
import math

import pytest
import torch

from argen.models.interface import Condition
from argen.sampling.decode import SamplerConfig, generate, seeded_generators
from argen.sampling.speculative import SpeculativeStats, generate_speculative
from tests.conftest import tiny_raster


def peaked(vocab_size=3, grid_size=2, scale=5.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = tiny_raster(vocab_size=vocab_size, grid_size=grid_size, num_classes=2, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def exact_distribution(model, label: int, config: SamplerConfig) -> dict[tuple, float]:
    """Enumerate every sequence and its probability under the (guided, processed) step distributions."""
    from argen.sampling.logits import process

    L, V = model.seq_len, model.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    schedule = config.schedule()
    labels = torch.full((len(seqs),), label)
    with torch.no_grad():
        logits = model(seqs[:, :-1], labels)
        if schedule is not None:
            uncond = model(seqs[:, :-1], Condition.classes(labels).as_null())
            scale = torch.tensor([schedule(t / (L - 1)) for t in range(L)])
            logits = uncond + (logits - uncond) * scale[None, :, None]
        logp = process(logits, config.temperature, config.top_k, config.top_p).log_softmax(-1)
    total = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(1).exp()
    return {tuple(s.tolist()): p.item() for s, p in zip(seqs, total, strict=True)}


def expected_tv(exact: dict[tuple, float], n: int) -> float:
    """Mean TV distance of an exact sampler's empirical distribution at n samples (normal approximation)."""
    return 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * n)) for p in exact.values())


def total_variation(samples: torch.Tensor, exact: dict[tuple, float]) -> float:
    counts: dict[tuple, int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    n = len(samples)
    return 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items())


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig.from_flat(dict(speculative="sjd", window=3)),
        SamplerConfig.from_flat(dict(speculative="mc-sjd", window=3, temperature=1.5)),
        SamplerConfig.from_flat(dict(speculative="sjd", window=2, cfg_scale=2.0, top_k=2)),
        SamplerConfig.from_flat(dict(speculative="draft", window=3, temperature=1.3)),
    ],
)
def test_speculative_samples_the_exact_distribution(config):
    """81 possible sequences (V=3, L=4): TV distance to the enumerated distribution stays at sampling noise."""
    target = peaked()
    draft = peaked(seed=1, scale=1.0)  # a different, flatter model: many rejections
    exact = exact_distribution(target, 1, config)
    n = 1200
    labels = torch.ones(n, dtype=torch.long)
    stats = SpeculativeStats()
    samples = generate_speculative(
        target, labels, config, seeded_generators(range(n)), config.schedule(), draft, stats
    )
    plain = generate(target, labels, config.with_overrides(speculative="none"), seeded_generators(range(n, 2 * n)))
    tv_spec, tv_plain, noise = total_variation(samples, exact), total_variation(plain, exact), expected_tv(exact, n)
    assert tv_spec < 1.5 * noise and tv_plain < 1.5 * noise, (tv_spec, tv_plain, noise)
    assert stats.target_passes < n * target.seq_len  # and it did save target passes
    assert 0 < stats.acceptance_rate <= 1


def test_a_biased_acceptance_rule_would_be_caught():
    """The check above has power: keeping every draft of a flatter model is clearly off."""
    target, draft = peaked(), peaked(seed=1, scale=1.0)
    exact = exact_distribution(target, 1, SamplerConfig())
    biased = generate(draft, torch.ones(1200, dtype=torch.long), SamplerConfig(), seeded_generators(range(1200)))
    assert total_variation(biased, exact) > 2 * expected_tv(exact, 1200)


@pytest.mark.parametrize("method", ["sjd", "mc-sjd", "draft"])
def test_greedy_speculative_equals_greedy_raster(method):
    target = peaked(vocab_size=16, grid_size=3, scale=5.0)
    draft = peaked(vocab_size=16, grid_size=3, scale=2.0, seed=3)
    labels = torch.tensor([0, 1, 0, 1])
    plain = generate(target, labels, SamplerConfig(greedy=True, cfg_scale=2.0))
    stats = SpeculativeStats()
    config = SamplerConfig.from_flat(dict(greedy=True, cfg_scale=2.0, speculative=method, window=4))
    spec = generate_speculative(target, labels, config, None, config.schedule(), draft, stats)
    assert torch.equal(spec, plain)
    assert stats.target_passes < 4 * 9


def test_draft_equal_to_target_accepts_everything():
    target = peaked(vocab_size=16, grid_size=3)
    config = SamplerConfig.from_flat(dict(speculative="draft", window=4))
    stats = SpeculativeStats()
    generate_speculative(target, torch.tensor([0, 1]), config, seeded_generators([0, 1]), None, target, stats)
    assert stats.acceptance_rate > 0.999
    assert stats.target_passes == math.ceil(9 / 5)  # 4 drafts + 1 bonus token per pass, both samples at once


@pytest.mark.parametrize("method", ["sjd", "mc-sjd", "draft"])
def test_a_sample_is_the_same_alone_or_in_a_batch(method):
    """Samples advance at their own pace inside one batched pass, each with its own random stream."""
    target = peaked(vocab_size=16, grid_size=3, scale=2.0)
    draft = peaked(vocab_size=16, grid_size=3, scale=1.0, seed=3)
    config = SamplerConfig.from_flat(dict(speculative=method, window=3, cfg_scale=1.5))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    stats = SpeculativeStats()
    batch = generate_speculative(target, labels, config, seeded_generators(range(6)), config.schedule(), draft, stats)
    alone = [
        generate_speculative(target, labels[i : i + 1], config, seeded_generators([i]), config.schedule(), draft)
        for i in range(6)
    ]
    assert torch.equal(batch, torch.cat(alone))
    assert stats.target_passes < 9  # fewer passes than tokens, for the whole batch


def test_speculative_errors():
    target = peaked()
    with pytest.raises(ValueError, match="needs a draft model"):
        generate(target, torch.tensor([0]), SamplerConfig.from_flat(dict(speculative="draft")))
    with pytest.raises(ValueError, match="speculative must be"):
        SamplerConfig.from_flat(dict(speculative="medusa"))


def peaked_random_order(vocab_size=3, grid_size=2, scale=5.0, seed=0):
    from tests.models.test_random_order import tiny_random_order

    torch.manual_seed(seed)
    model = tiny_random_order(vocab_size=vocab_size, grid_size=grid_size, num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def exact_random_order_distribution(model, label: int, config: SamplerConfig, raster: bool) -> dict[tuple, float]:
    """Every sequence's probability: along the identity order, or averaged over all L! orders (the sampler draws
    a uniform permutation per sample)."""
    from argen.sampling.logits import process

    L, V = model.seq_len, model.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    orders = [tuple(range(L))] if raster else list(itertools.permutations(range(L)))
    schedule = config.schedule()
    labels = torch.full((len(seqs),), label)
    total = torch.zeros(len(seqs), dtype=torch.float64)
    with torch.no_grad():
        for order in orders:
            o = torch.tensor(order)
            logits = model(seqs, labels, o)  # row k predicts the token at o[k]
            if schedule is not None:
                uncond = model(seqs, Condition.classes(labels).as_null(), o)
                scale = torch.tensor([schedule(t / (L - 1)) for t in range(L)])
                logits = uncond + (logits - uncond) * scale[None, :, None]
            logp = process(logits, config.temperature, config.top_k, config.top_p).log_softmax(-1)
            total += logp.gather(-1, seqs[:, o, None]).squeeze(-1).sum(1).double().exp()
    total /= len(orders)
    return {tuple(s.tolist()): p.item() for s, p in zip(seqs, total, strict=True)}


@pytest.mark.parametrize(
    "fields",
    [
        dict(speculative="sjd", window=3),
        dict(speculative="mc-sjd", window=2, cfg_scale=2.0, temperature=1.3),
        dict(speculative="sjd", window=3, order="raster"),
    ],
)
def test_speculative_random_order_samples_the_exact_distribution(fields):
    """Drafts checked along each sample's own permutation: 81 sequences (V=3, L=4), averaged over all 24 orders
    (or the identity order); TV distance to the enumerated distribution stays at sampling noise."""
    target = peaked_random_order()
    config = SamplerConfig.from_flat(fields)
    exact = exact_random_order_distribution(target, 1, config, raster=fields.get("order") == "raster")
    n = 1200
    labels = torch.ones(n, dtype=torch.long)
    stats = SpeculativeStats()
    samples = generate(target, labels, config, seeded_generators(range(n)), stats=stats)
    tv, noise = total_variation(samples, exact), expected_tv(exact, n)
    assert tv < 1.5 * noise, (tv, noise)
    assert stats.target_passes < n * target.seq_len and 0 < stats.acceptance_rate <= 1
    # the check has power: the flatter model's samples are clearly off
    flat = generate(peaked_random_order(seed=1, scale=1.0), labels, config, seeded_generators(range(n)))
    assert total_variation(flat, exact) > 2 * noise


@pytest.mark.parametrize("method", ["sjd", "mc-sjd"])
def test_greedy_speculative_random_order_equals_plain_greedy(method):
    """Same seeds, same permutations: greedy ids are identical, in fewer passes than tokens."""
    target = peaked_random_order(vocab_size=16, grid_size=3, scale=3.0)
    labels = torch.tensor([0, 1, 0, 1])
    plain = generate(target, labels, SamplerConfig(greedy=True, cfg_scale=2.0), seeded_generators(range(4)))
    config = SamplerConfig.from_flat(dict(greedy=True, cfg_scale=2.0, speculative=method, window=4))
    stats = SpeculativeStats()
    spec = generate(target, labels, config, seeded_generators(range(4)), stats=stats)
    assert torch.equal(spec, plain)
    assert stats.target_passes < 9


def test_speculative_random_order_sample_is_the_same_alone_or_in_a_batch():
    target = peaked_random_order(vocab_size=16, grid_size=3, scale=2.0)
    config = SamplerConfig.from_flat(dict(speculative="mc-sjd", window=3, cfg_scale=1.5))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    batch = generate(target, labels, config, seeded_generators(range(6)))
    alone = [generate(target, labels[i : i + 1], config, seeded_generators([i])) for i in range(6)]
    assert torch.equal(batch, torch.cat(alone))
    with pytest.raises(ValueError, match="raster order"):
        generate(target, labels, SamplerConfig.from_flat(dict(speculative="draft")), draft_model=target)
    with pytest.raises(ValueError, match="parallel steps"):
        generate(target, labels, SamplerConfig.from_flat(dict(speculative="sjd", steps=4)))
