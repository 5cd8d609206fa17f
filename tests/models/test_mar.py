"""MAR against the official code (../shared/parity/MAR_*: tiny official-layout weights, references and every
random draw of the official run, fed back here), and its own properties."""

import pytest
import torch

from argen.convert.mar import load_transformer, transformer_config
from argen.errors import ConfigError
from argen.models.interface import Condition
from argen.models.mar import MARConfig, MAROptions, MARTransformer
from argen.sampling import diffusion
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import check_guide, decode_steps
from argen.sampling.diffusion import sample_head
from argen.sampling.mar import MARPolicy
from tests.conftest import PARITY, assert_close_ref


@pytest.fixture(scope="module")
def official(mar_fixture):
    fields = mar_fixture[2]["mar_constructor"]
    return load_transformer(PARITY / "MAR_transformer.safetensors", transformer_config(fields))


def tiny_mar(**overrides) -> MARTransformer:
    """A seeded MAR small enough for unit tests (3 x 3 tokens of 4 values). Every parameter is redrawn (as the
    fixture's are): MAR zero-initialises the head's output, which would make samples ignore the condition."""
    fields = dict(
        num_classes=3,
        latent_size=3,
        latent_channels=4,
        encoder_dim=32,
        encoder_depth=1,
        encoder_heads=2,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        buffer_size=4,
        head_depth=2,
        head_width=32,
        diffusion_batch_mul=2,
    )
    torch.manual_seed(0)
    model = MARTransformer(MARConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else p + 0.1 * torch.randn_like(p))
    return model


def _draws(ref, prefix):
    return [ref[k] for k in sorted(k for k in ref if k.startswith(prefix + ".draw"))]


def test_official_key_set(official, mar_fixture):
    assert set(mar_fixture[0]["transformer"]) == set(official.state_dict())


def test_patchify_parity(official, mar_fixture):
    _, ref, meta, _ = mar_fixture
    assert_close_ref(official.patchify(ref["input.latent"]), "a.patchify", ref, meta)
    assert_close_ref(official.unpatchify(ref["a.patchify"]), "a.unpatchify", ref, meta)
    p2 = tiny_mar(latent_size=4, latent_channels=16, patch_size=2)  # patchify has no weights
    assert_close_ref(p2.patchify(ref["input.latent"]), "a.patchify_p2", ref, meta)
    assert_close_ref(p2.unpatchify(ref["a.patchify_p2"]), "a.unpatchify_p2", ref, meta)


@torch.no_grad()
def test_masked_encoder_decoder_parity(official, mar_fixture):
    _, ref, meta, _ = mar_fixture
    tokens, labels = ref["a.patchify"], Condition.classes(ref["input.labels"])
    masked = ref["b.mask"].bool()
    encoded, keep = official.forward_mae_encoder(tokens, masked, official.class_embedding(labels))
    assert_close_ref(encoded, "b.encoder_out", ref, meta)
    assert_close_ref(official.forward_mae_decoder(encoded, keep), "b.z", ref, meta)
    assert_close_ref(official.z(tokens, masked, labels.as_null()), "b.z_uncond", ref, meta)
    assert_close_ref(official.z(tokens, torch.ones_like(masked), labels), "b.z_allmasked", ref, meta)


@torch.no_grad()
def test_diffusion_loss_parity(official, mar_fixture):
    _, ref, meta, _ = mar_fixture
    target, z, masked = ref["a.patchify"], ref["b.z"], ref["b.mask"].bool()
    for case in ("c", "c2"):
        t, noise = _draws(ref, case)
        assert_close_ref(official.diffusion_loss(z, target, masked, t, noise), f"{case}.loss", ref, meta)
        rows = official.diffloss.loss_rows(
            target.reshape(32, 16).repeat(4, 1), z.reshape(32, 64).repeat(4, 1), t, noise
        )
        assert_close_ref(rows.mse, f"{case}.loss_rows_mse", ref, meta)
        assert_close_ref(rows.vb, f"{case}.loss_rows_vb", ref, meta)
    assert (ref["c2.draw000_randint"] == 0).any()  # the discretised-Gaussian branch is exercised
    t, noise = _draws(ref, "c2")
    net_out = official.head(target.reshape(32, 16)[:8], t[:8], z.reshape(32, 64)[:8])
    assert_close_ref(net_out, "c2.net_out", ref, meta)
    # c3: the whole forward (eval: no label dropout) with the official orders/mask and draws
    t, noise = _draws(ref, "c3")
    z3 = official.z(target, ref["c3.mask"].bool(), Condition.classes(ref["input.labels"]))
    assert_close_ref(official.diffusion_loss(z3, target, ref["c3.mask"].bool(), t, noise), "c3.loss", ref, meta)


def _replay(draws, rows):
    return lambda i: draws[i][:rows]


@torch.no_grad()
@pytest.mark.parametrize("case, cfg, temperature", [("d1", 1.0, 1.0), ("d2", 3.0, 1.0), ("d3", 1.0, 0.95)])
def test_head_sampling_parity(official, mar_fixture, case, cfg, temperature):
    _, ref, meta, _ = mar_fixture
    z, z_null = ref["d.z_cond"], ref["d.z_uncond"]
    schedule = official.head_schedule.respaced(8)
    draws = _draws(ref, case)
    guided = cfg != 1.0
    out = sample_head(official.head, z, schedule, _replay(draws, 6), temperature, cfg, z_null if guided else None)
    # Under guidance the official loop also carries the unconditional rows' own chain (rows 6..11: their own
    # noise, then discarded by sample_tokens); argen does not run it, so the conditional rows are compared.
    rows = {f"{case}.sample": ref[f"{case}.sample"][:6]}
    assert_close_ref(out, f"{case}.sample", rows, meta)


@torch.no_grad()
@pytest.mark.parametrize("case, cfg", [("e1", 3.0), ("e2", 1.0)])
def test_sample_tokens_parity(official, mar_fixture, monkeypatch, case, cfg):
    """The whole decode loop (MAR's sample_tokens, 4 steps, linear guidance) with the official orders and draws."""
    _, ref, meta, _ = mar_fixture
    orders = ref[f"{case}.orders"]
    draws = _draws(ref, case)  # per step: one randn, then 8 randn_like
    L = orders.shape[1]

    def draw_order(self, b, length):  # keys whose ascending order is the official permutation
        keys = torch.empty(length)
        keys[orders[b]] = torch.arange(length, dtype=torch.float32) / length
        return keys

    calls = []

    def replay(generators, owners, dim, device):
        step = len(calls)
        calls.append(step)
        return _replay(draws[9 * step : 9 * step + 9], len(owners))

    heads = []

    def recording_head(head, z, schedule, noise, temperature, cfg_scale, z_null, clip, *guide, interval):
        heads.append(z if z_null is None else torch.cat([z, z_null]))
        # the official sampler neither clips nor autoguides, and guides at every noise level
        assert clip == 0.0 and guide == (None, None, None) and interval == (0.0, 1.0)
        return sample_head(head, z, schedule, noise, temperature, cfg_scale, z_null, clip)

    monkeypatch.setattr(MARPolicy, "draw_order", draw_order)
    monkeypatch.setattr(diffusion, "per_sample_noise", replay)
    monkeypatch.setattr(diffusion, "sample_head", recording_head)
    config = SamplerConfig(cfg_scale=cfg, cfg_schedule="linear", order_options={"steps": 4, "head_steps": 8})
    steps = list(decode_steps(official, Condition.classes(ref["input.labels"]), config))
    assert len(steps) == 4 and len(calls) == 4
    previous = torch.zeros(2, L, dtype=torch.bool)
    for k, step in enumerate(steps):
        new = step.filled & ~previous
        previous = step.filled
        assert_close_ref(heads[k], f"{case}.step{k}.z", ref, meta)  # the head's conditions, cond rows first
        sampled = step.tokens[new]  # row-major (sample, position); under guidance the official rows go on with
        rows = {f"{case}.step{k}.sampled": ref[f"{case}.step{k}.sampled"][: len(sampled)]}  # the discarded chain
        assert_close_ref(sampled, f"{case}.step{k}.sampled", rows, meta)
    assert_close_ref(official.unpatchify(steps[-1].tokens), f"{case}.tokens", ref, meta)


def test_guidance_progress_quirk(official, mar_fixture):
    """MAR's linear guidance: 1 + (cfg - 1)(L - mask_len)/L with mask_len clamped to 1 at the last step."""
    _, ref, meta, _ = mar_fixture
    for case, cfg in (("e1", 3.0), ("e2", 1.0)):
        state = official.start(Condition.classes([3, 7]), MAROptions(steps=4, head_steps=8))
        policy = MARPolicy(official, MAROptions(steps=4, head_steps=8), 2, None, None)
        policy.begin(state)
        for k in range(4):
            progress = policy.guidance_progress(state)
            scale = torch.tensor([1 + (cfg - 1) * float(progress[0])])
            assert_close_ref(scale, f"{case}.step{k}.cfg_iter", ref, meta)
            positions = policy.positions(state)
            official.advance(state, positions, torch.zeros(2, positions.shape[1], 16))


def test_bf16_autocast_loss_is_finite():
    """MAR users' most common report is NaN losses under mixed precision: the head's loss runs its diffusion
    tables and terms in float32 whatever the autocast dtype."""
    model = tiny_mar().train()
    tokens = torch.randn(4, model.seq_len, model.token_dim, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(tokens, Condition.classes([0, 1, 2, 0]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ragged_known_tokens_keep_every_sample_to_itself():
    """Samples with different numbers of known tokens: the encoder runs each group of equal counts on its own, and
    a sample's output equals its output alone, bit for bit."""
    from argen.sampling.decode import generate, seeded_generators
    from argen.sampling.positions import KnownTokens

    model = tiny_mar().eval()
    g = torch.Generator().manual_seed(1)
    source = torch.randn(2, model.seq_len, model.token_dim, generator=g)
    known = torch.zeros(2, model.seq_len, dtype=torch.bool)
    known[0, :3] = True
    known[1, 5:] = True
    config = SamplerConfig(order_options={"steps": 4, "head_steps": 10})
    batch = generate(
        model, Condition.classes([0, 1]), config, seeded_generators([0, 1]), known=KnownTokens(source, known)
    )
    assert torch.equal(batch[known], source[known])
    for b in range(2):
        alone = generate(
            model,
            Condition.classes([b]),
            config,
            seeded_generators([b]),
            known=KnownTokens(source[b : b + 1], known[b : b + 1]),
        )
        assert torch.equal(batch[b : b + 1], alone)


def _head_calls(model: MARTransformer, config: SamplerConfig, labels: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Sampled tokens and the calls of the head's network at each AR step (a forward hook counts them)."""
    from argen.sampling.decode import seeded_generators

    total = [0]
    hook = model.diffloss.net.register_forward_hook(lambda *_: total.__setitem__(0, total[0] + 1))
    counts, tokens = [], None
    try:
        for step in decode_steps(model, Condition.classes(labels), config, seeded_generators(range(len(labels)))):
            counts.append(total[0] - sum(counts))
            tokens = step.tokens
    finally:
        hook.remove()
    return tokens, counts


@pytest.mark.parametrize(
    "annealing, expected",
    [("linear", [9, 7, 6, 4, 2]), ("cosine", [9, 8, 6, 3, 2]), ("two-stage", [9, 9, 2, 2, 2])],
)
def test_disa_anneals_the_heads_steps_as_specified(annealing, expected):
    """DiSA: the head's steps go from head_steps at the first AR step to head_steps_last at the last, along the
    chosen annealing; each head step is one call of the head's network (the guided rows ride in the same call).
    The 9 tokens' cosine schedule reveals some at each of the 5 steps, so every step calls the head."""
    options = MAROptions(steps=5, head_steps=9, head_steps_last=2, head_annealing=annealing)
    assert [options.head_steps_at(k, 5) for k in range(5)] == expected
    fields = {"steps": 5, "head_steps": 9, "head_steps_last": 2, "head_annealing": annealing}
    config = SamplerConfig(cfg_scale=2.0, cfg_schedule="linear", order_options=fields)
    model = tiny_mar().eval()
    assert _head_calls(model, config, [0, 2])[1] == expected
    # what a server caps: the AR steps' transformer passes plus the head calls they make
    assert model.start(Condition.classes([0]), options).passes == 5 + sum(expected)


def test_counting_the_heads_calls_does_not_walk_steps_that_reveal_nothing():
    huge = MAROptions(steps=10**12, head_steps=3)  # a request's JSON can carry any integer
    assert huge.head_passes(9) == 9 * 3  # 8 steps reveal one token each, the last step the ninth
    assert MAROptions(steps=1, head_steps=3).head_passes(49) == 3
    assert MAROptions(steps=16, head_steps=100, head_steps_last=10).head_passes(49) == 16 * 55


def test_disa_off_is_plain_mar_and_on_changes_the_samples():
    model = tiny_mar().eval()
    plain = SamplerConfig(order_options={"steps": 4, "head_steps": 8})
    base, base_calls = _head_calls(model, plain, [0, 1, 2])
    for off in ({"head_steps_last": 0}, {"head_steps_last": 8, "head_annealing": "cosine"}):
        same, calls = _head_calls(model, plain.with_overrides(**off), [0, 1, 2])
        assert torch.equal(same, base) and calls == base_calls == [8, 8, 8, 8]
    annealed, calls = _head_calls(model, plain.with_overrides(head_steps_last=2), [0, 1, 2])
    assert calls == [8, 6, 4, 2] and not torch.equal(annealed, base)
    with pytest.raises(ConfigError, match="head_annealing 'quadratic' unknown"):
        plain.with_overrides(head_steps_last=2, head_annealing="quadratic").options_for(model.order)
    one_step, calls = _head_calls(model, plain.with_overrides(head_steps=1), [0])  # a one-step head is finite
    assert calls == [1, 1, 1, 1] and bool(one_step.isfinite().all())


def test_a_guidance_interval_reaches_the_head_through_the_sampler_settings():
    """`head_cfg_low` / `head_cfg_high` (the flat names of files and --set) limit guidance to those noise levels of
    the head: the whole range is plain guidance bit for bit, a narrower one changes the samples, an empty one
    (no step's level inside) samples what no guidance does, and a reversed or out-of-range one is refused by name."""
    model = tiny_mar().eval()
    guided = SamplerConfig(cfg_scale=3.0, order_options={"steps": 3, "head_steps": 6})
    base, _ = _head_calls(model, guided, [0, 1])
    whole, _ = _head_calls(model, guided.with_overrides(head_cfg_low=0.0, head_cfg_high=1.0), [0, 1])
    assert torch.equal(whole, base)
    middle, _ = _head_calls(model, guided.with_overrides(head_cfg_low=0.3, head_cfg_high=0.7), [0, 1])
    assert not torch.allclose(middle, base)
    unguided, _ = _head_calls(model, guided.with_overrides(cfg_scale=1.0), [0, 1])
    nowhere, _ = _head_calls(model, guided.with_overrides(head_cfg_low=0.9999, head_cfg_high=1.0), [0, 1])
    assert torch.allclose(nowhere, unguided, atol=1e-5)
    for bad, message in (
        ({"head_cfg_low": 0.8, "head_cfg_high": 0.2}, "head_cfg_low .0.8. must not exceed head_cfg_high"),
        ({"head_cfg_high": 1.5}, "head_cfg_high"),
    ):
        with pytest.raises(ConfigError, match=message):
            guided.with_overrides(**bad).options_for(model.order)


def test_loss_takes_tokens_or_the_tokenizers_latents():
    """MAR's forward patchifies the tokenizer's (B, C, H, W) latents; the loss takes those or (B, L, D) tokens (what
    `argen eval` passes through the order's loss)."""
    model = tiny_mar().eval()
    latents = torch.randn(2, 4, 3, 3)
    torch.manual_seed(5)
    from_latents = model.loss(latents, Condition.classes([0, 1]))
    torch.manual_seed(5)
    from_tokens = model.loss(model.patchify(latents), Condition.classes([0, 1]))
    assert torch.equal(from_latents.loss, from_tokens.loss) and from_latents.nll_sum is None


def test_a_guide_must_sample_the_same_values_over_the_same_noise_schedule():
    """Autoguidance contrasts two heads' noise predictions on one chain: a guide of another value size is refused by
    name; one of another width (a weaker head) is a guide."""
    model = tiny_mar()
    check_guide(model, tiny_mar(head_width=16))
    with pytest.raises(ConfigError, match="value size and noise schedule"):
        check_guide(model, tiny_mar(latent_channels=2))
    with pytest.raises(ConfigError, match="eps or v"):
        check_guide(model, tiny_mar(head_prediction="v"))


def test_a_v_predicting_head_is_trained_on_v_and_sampled_as_v():
    """`head_prediction="v"` changes what the loss asks of the head (the same draws give another loss) and what the
    sampler reads from it; the config refuses anything else by name."""
    eps, v = tiny_mar(), tiny_mar(head_prediction="v")
    assert v.head_schedule.prediction == "v" and v.head_schedule.respaced(10).prediction == "v"
    latents, labels = torch.randn(2, 4, 3, 3), Condition.classes([0, 1])
    torch.manual_seed(5)
    loss_eps = eps.loss(latents, labels).loss
    torch.manual_seed(5)
    loss_v = v.loss(latents, labels).loss
    assert torch.isfinite(loss_v) and not torch.allclose(loss_eps, loss_v)
    # the same network outputs, read as v: a different chain, as finite
    z = torch.randn(6, 32)
    schedule = v.head_schedule.respaced(5)
    noise = torch.randn(6, 4)
    as_v = sample_head(v.head, z, schedule, lambda i: noise * (i + 1) / 5)
    as_eps = sample_head(eps.head, z, eps.head_schedule.respaced(5), lambda i: noise * (i + 1) / 5)
    assert torch.isfinite(as_v).all() and not torch.allclose(as_v, as_eps)
    with pytest.raises(ConfigError, match="head_prediction"):
        MARConfig(head_prediction="x0")
