"""The order contract, checked for every order on tiny seeded models (DESIGN.md "The order contract").

A new order gets every test here by adding one line to ORDERS: a factory returning (generator, tokenizer the
generator reads or None). Models are scaled up so that distributions are peaked and a wrong position, a
leaked condition or a batch-dependent draw changes the sampled ids.
"""

from __future__ import annotations

import copy

import pytest
import torch

from argen.errors import ConfigError, NonFiniteError
from argen.models.interface import Condition, Generator
from argen.pretrained import load_pretrained
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import generate, seeded_generators
from argen.sampling.positions import KnownTokens
from tests.conftest import tiny_raster


def _peaked(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


def raster():
    return _peaked(tiny_raster(vocab_size=16, num_classes=3, grid_size=3), 4.0), None


def next_scale():
    from argen.models.next_scale import NextScaleConfig, NextScaleTransformer
    from tests.tokenizers.test_multiscale import tiny as tiny_multiscale

    tokenizer = tiny_multiscale().eval()
    torch.manual_seed(0)
    config = NextScaleConfig(vocab_size=32, num_classes=3, scales=(1, 2, 4), token_dim=4, depth=2, dim=32, num_heads=4)
    model = NextScaleTransformer(config)
    with torch.no_grad():  # VAR's init keeps the heads near zero: wake them up so samples depend on the weights
        model.head.weight.normal_(0, 1.0)
    return _peaked(model, 2.0).bind(tokenizer), tokenizer


def masked():
    from tests.models.test_masked import tiny_masked

    return _peaked(tiny_masked(), 4.0), None


def random_order():
    from tests.models.test_random_order import tiny_random_order

    return _peaked(tiny_random_order(vocab_size=16), 4.0), None


def mar():
    from tests.models.test_mar import tiny_mar

    return tiny_mar().eval(), None


# One line per order: (name, factory, the order defines step-by-step == teacher-forced)
ORDERS = [
    pytest.param(raster, True, id="raster"),
    pytest.param(next_scale, True, id="next-scale"),
    pytest.param(random_order, False, id="random-order"),
    pytest.param(masked, False, id="masked"),
    pytest.param(mar, False, id="mar"),
]


def _random_tokens(model, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L) ids, or (B, L, D) standard normal vectors for a continuous order."""
    if model.order.values == "continuous":
        return torch.randn(batch_size, model.seq_len, model.token_dim, generator=generator)
    return torch.randint(0, model.vocab_size, (batch_size, model.seq_len), generator=generator)


def _sample(model, classes, seeds, **flat):
    config = SamplerConfig.from_flat(flat)
    return generate(model, Condition.classes(classes), config, seeded_generators(seeds))


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_satisfies_the_interface(factory, teacher_forced):
    model, _ = factory()
    assert isinstance(model, Generator)
    tokens = _sample(model, [0, 1], [0, 1])
    if model.order.values == "continuous":
        assert tokens.shape == (2, model.seq_len, model.token_dim) and tokens.is_floating_point()
        assert torch.isfinite(tokens).all()
        return
    assert tokens.shape == (2, model.seq_len) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.vocab_size


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_save_load_round_trip_gives_identical_outputs(factory, teacher_forced, tmp_path):
    model, tokenizer = factory()
    model.save_pretrained(tmp_path / "generator")
    loaded = load_pretrained(tmp_path / "generator").eval()
    if model.order.reads_tokenizer:
        loaded.bind(tokenizer)
    for cfg in (1.0, 2.0):
        assert torch.equal(
            _sample(model, [0, 1, 2], [3, 4, 5], cfg_scale=cfg), _sample(loaded, [0, 1, 2], [3, 4, 5], cfg_scale=cfg)
        )
    tokens = _random_tokens(model, 3, torch.Generator().manual_seed(0))
    condition = Condition.classes([0, 1, 2])
    torch.manual_seed(0)
    a = model.loss(tokens, condition).loss
    torch.manual_seed(0)
    assert torch.equal(a, loaded.loss(tokens, condition).loss)


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_batch_of_four_equals_four_single_runs(factory, teacher_forced, cfg):
    model, _ = factory()
    batch = _sample(model, [0, 1, 2, 1], [10, 11, 12, 13], cfg_scale=cfg, temperature=1.2)
    singles = [
        _sample(model, [c], [s], cfg_scale=cfg, temperature=1.2)
        for c, s in zip([0, 1, 2, 1], [10, 11, 12, 13], strict=True)
    ]
    assert torch.equal(batch, torch.cat(singles))
    assert not torch.equal(batch[0], batch[2])  # the classes and seeds do change the samples


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_guidance_scale_one_equals_unguided(factory, teacher_forced):
    model, _ = factory()
    condition, seeds = Condition.classes([0, 1, 2]), [7, 8, 9]
    plain = generate(model, condition, SamplerConfig(), seeded_generators(seeds))
    # A schedule that is 1 everywhere still runs the unconditional rows: their presence must not change a sample.
    guided_path = generate(model, condition, SamplerConfig(), seeded_generators(seeds), schedule=lambda t: 1.0)
    assert torch.equal(plain, guided_path)
    strong = generate(model, condition, SamplerConfig(cfg_scale=4.0), seeded_generators(seeds))
    assert not torch.equal(plain, strong)


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_known_tokens_are_kept_exactly(factory, teacher_forced):
    model, _ = factory()
    g = torch.Generator().manual_seed(1)
    source = _random_tokens(model, 3, g)
    known = torch.rand(3, model.seq_len, generator=g) < 0.5
    for cfg in (1.0, 2.0):
        config = SamplerConfig(cfg_scale=cfg)
        out = generate(
            model, Condition.classes([0, 1, 2]), config, seeded_generators([0, 1, 2]), known=KnownTokens(source, known)
        )
        assert torch.equal(out[known], source[known])
        assert not torch.equal(out[~known], source[~known])  # the rest is generated, not copied


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
@torch.no_grad()
def test_step_by_step_equals_teacher_forced(factory, teacher_forced):
    """Feeding the true tokens back step by step gives the likelihood the training loss computes in one pass."""
    model, _ = factory()
    if not teacher_forced:
        pytest.skip("the order's loss is over random masks or permutations: its own tests compare the two")
    tokens = torch.randint(0, model.vocab_size, (2, model.seq_len), generator=torch.Generator().manual_seed(2))
    condition = Condition.classes([1, 2])
    state, nll = model.start(condition), 0.0
    while not state.done:
        prediction = model.predict(state)
        values = tokens.gather(1, prediction.positions)
        logp = prediction.logits.log_softmax(-1).gather(-1, values[..., None])
        nll -= logp.sum().item()
        model.advance(state, prediction.positions, values)
    assert state.filled.all() and torch.equal(state.tokens, tokens)
    out = model.loss(tokens, condition)
    assert out.num_targets == tokens.numel()
    assert nll == pytest.approx(out.nll_sum.item(), rel=1e-4)


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_loss_falls_when_overfitting_one_batch(factory, teacher_forced):
    model, _ = factory()
    model.train()
    tokens = _random_tokens(model, 4, torch.Generator().manual_seed(3))
    condition = Condition.classes([0, 1, 2, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        out = model.loss(tokens, condition)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_non_finite_predictions_raise_a_clear_error(factory, teacher_forced):
    model, _ = factory()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        _sample(model, [0], [0])


def _guide_for(model, tokenizer, noise: float):
    """A guide for autoguidance: a copy of the generator, its matrices perturbed by `noise` (0: the same model)."""
    guide = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in guide.parameters():
            if p.dim() == 2:
                p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    return guide.bind(tokenizer) if model.order.reads_tokenizer else guide


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_autoguidance(factory, teacher_forced):
    """guide_scale contrasts the generator with a weaker model of the same order: nothing changes when the guide
    is the generator itself, samples change when it is not, and the per-sample rules (batch == singles, known tokens
    kept) hold as for classifier-free guidance."""
    model, tokenizer = factory()
    classes, seeds = Condition.classes([0, 1, 2, 1]), [20, 21, 22, 23]
    same, other = _guide_for(model, tokenizer, 0.0), _guide_for(model, tokenizer, 1.0)
    config = SamplerConfig(guide_scale=3.0, temperature=1.2)
    plain = generate(model, classes, SamplerConfig(temperature=1.2), seeded_generators(seeds))
    assert torch.equal(generate(model, classes, config, seeded_generators(seeds), guide_model=same), plain)
    guided = generate(model, classes, config, seeded_generators(seeds), guide_model=other)
    assert not torch.equal(guided, plain)
    both = SamplerConfig(guide_scale=3.0, cfg_scale=2.0, temperature=1.2)
    batch = generate(model, classes, both, seeded_generators(seeds), guide_model=other)
    singles = [
        generate(model, classes.rows([i]), both, seeded_generators([s]), guide_model=other)
        for i, s in enumerate(seeds)
    ]
    assert torch.equal(batch, torch.cat(singles))
    source = _random_tokens(model, 4, torch.Generator().manual_seed(1))
    known = torch.rand(4, model.seq_len, generator=torch.Generator().manual_seed(2)) < 0.5
    known_tokens = KnownTokens(source, known)
    kept = generate(model, classes, both, seeded_generators(seeds), known=known_tokens, guide_model=other)
    assert torch.equal(kept[known], source[known])
    with pytest.raises(ConfigError, match="needs a guide model"):
        generate(model, classes, config, seeded_generators(seeds))


@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_passes_count_the_network_calls_a_decode_makes(factory, teacher_forced):
    """`DecodeState.passes` is what a server caps, one measure across orders: it must be what decoding costs."""
    model, _ = factory()
    calls = []
    predict = model.predict
    model.predict = lambda *a, **k: calls.append("predict") or predict(*a, **k)
    flat = {}
    if model.order.values == "continuous":  # the head's network, called once per head step
        model.diffloss.net.register_forward_hook(lambda *_: calls.append("head"))
        # more steps than the 9 tokens (the steps revealing none skip the head), the head's steps annealed by DiSA
        flat = {"steps": 12, "head_steps": 8, "head_steps_last": 2}
    _sample(model, [0, 1], [0, 1], **flat)
    state = model.start(Condition.classes([0]), SamplerConfig.from_flat(flat).options_for(model.order))
    assert state.passes == len(calls) and calls.count("predict") == state.num_steps
