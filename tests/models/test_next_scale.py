import pytest
import torch

from argen.convert.var import load_transformer, load_vqvae, transformer_config
from argen.models.next_scale import NextScaleOptions
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import generate
from tests.conftest import PARITY, assert_close_ref
from tests.tokenizers.test_multiscale import FIXTURE


@pytest.fixture(scope="module")
def official(var_fixture):
    fields = var_fixture[3]["transformer"]["constructor_args"]
    vq = load_vqvae(PARITY / "VAR_tokenizer.safetensors", FIXTURE)
    gen = load_transformer(PARITY / "VAR_transformer.safetensors", transformer_config(fields, 16, 1024))
    return gen.bind(vq), vq


@torch.no_grad()
def test_teacher_forced_logits_parity(official, var_fixture):
    gen, _ = official
    _, ref, meta, _ = var_fixture
    assert_close_ref(gen(ref["tf_x_BLCv_wo_first_l"], ref["tf_label"]), "tf_logits", ref, meta)
    tokens = torch.cat([ref[f"tok_idx_s{s}"] for s in range(4)], dim=1)
    assert_close_ref(gen.training_inputs(tokens), "tf_x_BLCv_wo_first_l", ref, meta)


@torch.no_grad()
def test_kv_cached_scale_by_scale_equals_teacher_forcing(official, var_fixture):
    gen, _ = official
    _, ref, meta, _ = var_fixture
    state = gen.start(ref["tf_label"])
    rows = []
    for s in range(4):
        prediction = gen.predict(state)
        rows.append(prediction.logits)
        gen.advance(state, prediction.positions, ref[f"tok_idx_s{s}"])
    logits = torch.cat(rows, dim=1)
    assert_close_ref(logits[:, :5], "kv_tf_logits_first2scales", ref, meta)
    assert_close_ref(logits, "tf_logits", ref, meta)  # all 30 rows, not only the two stored scales


@torch.no_grad()
def test_greedy_guided_sampling_parity(official, var_fixture):
    gen, vq = official
    _, ref, meta, _ = var_fixture
    # VAR's cfg=4 is guidance scale 5 in argen's one convention (scale 1 = no guidance for every schedule)
    ids = generate(gen, ref["greedy_label"], SamplerConfig(cfg_scale=5.0, cfg_schedule="var_ramp", greedy=True))
    assert_close_ref(ids, "greedy_idx", ref, meta)
    f_hat = vq.quantize.ids_to_fhat(vq.split(ids), 4)
    assert_close_ref(f_hat, "greedy_fhat", ref, meta)
    assert_close_ref((vq.decode(ids) + 1) / 2, "greedy_image", ref, meta)


def test_official_key_set(official, var_fixture):
    gen, vq = official
    assert set(var_fixture[0]["transformer"]) == set(gen.state_dict())


# --- accelerations: FastVAR-style token pruning and a ScaleKV-style KV budget, on the shipped model ---


@pytest.fixture(scope="module")
def shipped():
    from argen.pipeline import ARPipeline

    return ARPipeline.from_pretrained("next-scale").generator


def _two_sequences(gen):
    """Labels (2,) and seeded random token sequences (2, L) to teacher-force."""
    g = torch.Generator().manual_seed(0)
    return torch.tensor([3, 7]), torch.randint(gen.vocab_size, (2, gen.seq_len), generator=g)


@torch.no_grad()
def _teacher_forced_logits(gen, tokens, labels, **options):
    """Scale-by-scale logits with the given tokens fed back, under start(**options)."""
    state = gen.start(labels, NextScaleOptions(**options))
    rows = []
    while not state.done:
        prediction = gen.predict(state)
        rows.append(prediction.logits)
        gen.advance(state, prediction.positions, tokens.gather(1, prediction.positions))
    return torch.cat(rows, dim=1), state


@torch.no_grad()
def test_pruned_block_keeping_every_token_is_the_plain_block(shipped):
    gen = shipped
    state = gen.start(torch.tensor([1, 2]))
    for _ in range(4):  # reach scale 4 so that the previous scale's block outputs exist
        prediction = gen.predict(state)
        gen.advance(state, prediction.positions, prediction.logits.argmax(-1))
    x = torch.randn(2, 25, gen.config.dim)
    block, previous = gen.blocks[2], state.extra["layer_out"][2]
    cache_a, cache_b = gen.start(torch.tensor([1, 2])).cache, gen.start(torch.tensor([1, 2])).cache
    full = block(x, state.extra["cond"], None, cache_a, 2, 0)
    pruned = gen._pruned_block(block, 2, x, 25, previous, state.extra["cond"], cache_b, 0)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pruning_ratio_zero_and_full_kv_budget_are_the_baseline(shipped):
    labels, tokens = _two_sequences(shipped)
    base, _ = _teacher_forced_logits(shipped, tokens, labels)
    zero, _ = _teacher_forced_logits(shipped, tokens, labels, prune=0.0, prune_scales=3)
    full, state = _teacher_forced_logits(shipped, tokens, labels, kv_budget=10_000, kv_drafters=0)
    assert torch.equal(zero, base)
    torch.testing.assert_close(full, base)  # a budget the cache never exceeds: nothing observed, nothing evicted
    assert state.cache.size() == len(shipped.blocks) * shipped.seq_len
    cfg = SamplerConfig(cfg_scale=2.0, cfg_schedule="var_ramp")
    g = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    plain = generate(shipped, labels, cfg, g)
    g = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    budget = SamplerConfig.from_flat({"cfg_scale": 2.0, "cfg_schedule": "var_ramp", "kv_budget": 10_000})
    same = generate(shipped, labels, budget, g)
    assert torch.equal(plain, same)


@torch.no_grad()
def test_pruning_touches_only_the_largest_scales_and_skips_tokens(shipped):
    labels, tokens = _two_sequences(shipped)
    base, _ = _teacher_forced_logits(shipped, tokens, labels)
    pruned, state = _teacher_forced_logits(shipped, tokens, labels, prune=0.5, prune_scales=2)
    b = shipped.bounds
    torch.testing.assert_close(pruned[:, : b[-3]], base[:, : b[-3]])  # scales before the pruned two: unchanged
    assert not torch.allclose(pruned[:, b[-2] :], base[:, b[-2] :])
    # later layers cached only the kept tokens: half the largest map's pruned, a quarter of the one before's
    last, before = shipped.scales[-1] ** 2, shipped.scales[-2] ** 2  # 49 - 24 and 36 - 9 on the shipped model
    first = shipped._first_pruned_layer()
    assert state.cache.keys[0].shape[2] == shipped.seq_len
    assert state.cache.keys[first].shape[2] == b[-3] + (before - before // 4) + (last - last // 2)
    # lossy but close: the argmax tokens at the largest scale agree far more often than by chance (1 in 512). The
    # shipped model agrees on 40 % of these random sequences' (the six-scale one before it 62 %), and both on
    # ~26-29 % of their own samples': what pruning costs in FD is measured in bench/fast_sampling.py.
    agree = (pruned[:, b[-2] :].argmax(-1) == base[:, b[-2] :].argmax(-1)).float().mean()
    assert agree > 0.3


@torch.no_grad()
def test_kv_budget_caps_refiner_layers(shipped):
    labels, tokens = _two_sequences(shipped)
    base, full = _teacher_forced_logits(shipped, tokens, labels)
    capped, state = _teacher_forced_logits(shipped, tokens, labels, kv_budget=16, kv_drafters=1)
    sizes = sorted(k.shape[2] for k in state.cache.keys)
    assert sizes == [16] * (len(shipped.blocks) - 1) + [shipped.seq_len]
    assert state.cache.peak < full.cache.peak
    b = shipped.bounds
    torch.testing.assert_close(capped[:, : b[3]], base[:, : b[3]])  # until the cache first exceeds 16 entries
    assert torch.isfinite(capped).all() and not torch.allclose(capped, base)


def test_generator_options_are_checked(shipped):
    from tests.conftest import tiny_raster

    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['prune'\] for the raster order"):
        generate(tiny_raster(), torch.tensor([0]), SamplerConfig.from_flat({"prune": 0.5}))
    # the config alone no longer refuses order options beside an acceleration (random-order combines them); the
    # next-scale order refuses speculative decoding when the two meet
    with pytest.raises(ValueError, match="does not fit the next-scale order"):
        generate(shipped, torch.tensor([0]), SamplerConfig.from_flat({"kv_budget": 8, "speculative": "sjd"}))


def test_drop_rate_regularises_training_only(shipped):
    """VAR's dropout on the attention projection and FFN outputs: parameter-free (checkpoints and the official
    key set are unchanged), active in training, gone in eval."""
    import dataclasses

    from argen.models.interface import Condition
    from argen.models.next_scale import NextScaleTransformer

    quiet = dict(class_dropout=0.0, drop_path=0.0, input_noise=0.0)  # no other training-time noise
    plain = NextScaleTransformer(dataclasses.replace(shipped.config, drop_rate=0.0, **quiet))
    dropped = NextScaleTransformer(dataclasses.replace(shipped.config, drop_rate=0.3, **quiet))
    plain.load_state_dict(shipped.state_dict())
    dropped.load_state_dict(shipped.state_dict())  # the same keys: dropout has no weights
    tok = shipped._tokenizer[0]
    for model in (plain, dropped):
        model.bind(tok)
    labels, tokens = _two_sequences(shipped)
    condition = Condition.classes(labels)
    with torch.no_grad():
        plain.eval()
        dropped.eval()
        assert torch.equal(plain.loss(tokens, condition).loss, dropped.loss(tokens, condition).loss)
        reference = plain.loss(tokens, condition).loss
        plain.train()
        dropped.train()
        assert torch.equal(plain.loss(tokens, condition).loss, reference)  # nothing else is random in training
        noisy = [dropped.loss(tokens, condition).loss for _ in range(2)]
    assert noisy[0] != noisy[1] and noisy[0] != reference  # a fresh dropout mask per call
    with pytest.raises(ValueError, match="drop_rate"):
        dataclasses.replace(shipped.config, drop_rate=1.5)


def test_input_noise_corrupts_the_coarser_scales_inputs_in_training_only(shipped):
    """Random codes among the teacher-forced inputs (the coarser scales' maps); the targets stay the clean tokens."""
    import dataclasses

    from argen.models.interface import Condition
    from argen.models.next_scale import NextScaleTransformer

    quiet = dict(class_dropout=0.0, drop_path=0.0, drop_rate=0.0, input_noise_maps=0)
    plain = NextScaleTransformer(dataclasses.replace(shipped.config, input_noise=0.0, **quiet))
    noisy = NextScaleTransformer(dataclasses.replace(shipped.config, input_noise=0.5, **quiet))
    for model in (plain, noisy):
        model.load_state_dict(shipped.state_dict())  # the same keys: the noise has no weights
        model.bind(shipped._tokenizer[0])
    labels, tokens = _two_sequences(shipped)
    condition = Condition.classes(labels)
    with torch.no_grad():
        reference = plain.eval().loss(tokens, condition).loss
        assert torch.equal(noisy.eval().loss(tokens, condition).loss, reference)
        plain.train()
        noisy.train()
        state = torch.get_rng_state()
        assert torch.equal(plain.loss(tokens, condition).loss, reference)
        assert torch.equal(torch.get_rng_state(), state)  # no noise, no draw: a run's random stream is unchanged
        corrupted = [noisy.loss(tokens, condition).loss for _ in range(2)]
    assert reference not in corrupted and corrupted[0] != corrupted[1]  # fresh noise per call
    with pytest.raises(ValueError, match="input_noise"):
        dataclasses.replace(shipped.config, input_noise=-0.1)


def _changed_per_scale(shipped, **fields) -> list[float]:
    """The share of each map's teacher-forced input tokens that one training loss replaced."""
    import dataclasses

    from argen.models.interface import Condition
    from argen.models.next_scale import NextScaleTransformer

    fields = {"input_noise_maps": 0, **fields}  # the shipped model's own window unless the test names one
    model = NextScaleTransformer(dataclasses.replace(shipped.config, class_dropout=0.0, **fields))
    model.load_state_dict(shipped.state_dict())
    model.bind(shipped._tokenizer[0])
    seen = []
    build = model.training_inputs
    model.training_inputs = lambda ids: seen.append(ids.clone()) or build(ids)
    torch.manual_seed(0)
    labels = torch.arange(10).repeat(20)
    tokens = torch.randint(0, shipped.config.vocab_size, (len(labels), shipped.seq_len))
    with torch.no_grad():
        model.train().loss(tokens, Condition.classes(labels))
    changed = (seen[0] != tokens).float()
    starts = [0]
    for pn in model.scales:
        starts.append(starts[-1] + pn * pn)
    return [changed[:, a:b].mean().item() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_input_noise_grows_with_the_scale(shipped):
    """None on the first map (a wrong token there redraws the layout), the full rate on the last input map."""
    per_scale = _changed_per_scale(shipped, input_noise=0.9)
    inputs = len(shipped.scales) - 1
    assert per_scale[0] == 0.0
    for i in range(1, inputs):  # rate i / (inputs - 1), less the codes redrawn equal by chance
        assert abs(per_scale[i] - 0.9 * i / (inputs - 1)) < 0.06, per_scale


@pytest.mark.parametrize("maps", [1, 2])
def test_input_noise_maps_narrows_the_ramp_to_the_last_input_maps(shipped, maps):
    """`input_noise_maps=k`: the ramp rises over the last k input maps only, to the full rate on the last one."""
    import dataclasses

    per_scale = _changed_per_scale(shipped, input_noise=0.9, input_noise_maps=maps)
    last = len(shipped.scales) - 2  # the last input map
    for i in range(last + 1):
        expected = 0.9 * max(i - (last - maps), 0) / maps
        assert (per_scale[i] == 0.0) if expected == 0 else abs(per_scale[i] - expected) < 0.06, (i, per_scale)
    K = len(shipped.scales)
    with pytest.raises(ValueError, match=f"input_noise_maps={K}: only {K - 1} of the {K} maps are inputs"):
        dataclasses.replace(shipped.config, input_noise_maps=K)
