import pytest
import torch

from argen.convert.llamagen import load_gpt, raster_config
from argen.errors import ConfigError
from argen.models.raster import RasterTransformer
from argen.sampling import guidance, values
from argen.sampling.decode import SamplerConfig, generate, seeded_generators
from tests.conftest import PARITY, assert_close_ref, tiny_raster


@pytest.fixture(scope="module")
def official_gpt(llamagen_fixture):
    fields = llamagen_fixture[3]["transformer"]["constructor_args"]["fields"]
    return load_gpt(PARITY / "LlamaGen_transformer.safetensors", raster_config(fields))


def test_greedy_cfg_parity(official_gpt, llamagen_fixture, monkeypatch):
    _, ref, meta, _ = llamagen_fixture
    seen = []
    original = values.guide_rows  # the decode loop's guidance: one scale per sample

    def spy(logits, scales):
        out = original(logits, scales)
        seen.append(out)
        return out

    monkeypatch.setattr(values, "guide_rows", spy)
    ids = generate(official_gpt, ref["greedy_cond"], SamplerConfig(cfg_scale=4.0, greedy=True))
    assert_close_ref(torch.cat(seen, dim=1), "greedy_logits", ref, meta)
    assert_close_ref(ids, "greedy_idx", ref, meta)


def test_greedy_cfg_interval_parity(official_gpt, llamagen_fixture):
    _, ref, meta, _ = llamagen_fixture
    schedule = guidance.interval(4.0, cfg_interval=7, num_steps=16)
    ids = generate(official_gpt, ref["greedy_cond"], SamplerConfig(greedy=True), schedule=schedule)
    assert_close_ref(ids, "greedy_cfg_interval7_idx", ref, meta)


def tiny() -> RasterTransformer:
    model = tiny_raster(vocab_size=16, num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0) if p.dim() == 2 else None  # peaked, label-dependent distributions
    return model


@pytest.mark.parametrize("config", [SamplerConfig(), SamplerConfig(cfg_scale=3.0, top_k=5, top_p=0.9)])
def test_batch_of_four_equals_four_singles(config):
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    batch = generate(model, labels, config, seeded_generators(seeds))
    singles = torch.cat(
        [generate(model, labels[i : i + 1], config, seeded_generators([s])) for i, s in enumerate(seeds)]
    )
    assert torch.equal(batch, singles)
    assert batch.shape == (4, 9)


def test_same_seed_same_tokens_different_seed_differs():
    model = tiny()
    labels = torch.tensor([1] * 4)
    a = generate(model, labels, SamplerConfig(temperature=2.0), seeded_generators([0, 1, 2, 3]))
    b = generate(model, labels, SamplerConfig(temperature=2.0), seeded_generators([0, 1, 2, 3]))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1


def test_cfg_one_equals_unguided_path():
    model = tiny()
    labels = torch.tensor([0, 3])
    plain = generate(model, labels, SamplerConfig(), seeded_generators([5, 6]))
    # A schedule that is 1 everywhere runs the doubled batch but must give the conditional result.
    ones = generate(model, labels, SamplerConfig(), seeded_generators([5, 6]), schedule=guidance.constant(1.0))
    assert torch.equal(plain, ones)


def test_guidance_changes_samples_and_schedules():
    model = tiny()
    labels = torch.tensor([0, 1])
    plain = generate(model, labels, SamplerConfig(greedy=True))
    guided = generate(model, labels, SamplerConfig(cfg_scale=5.0, greedy=True))
    assert not torch.equal(plain, guided)
    assert guidance.linear(3.0)(0.0) == 1.0 and guidance.linear(3.0)(1.0) == 3.0
    # one meaning of "no guidance": scale 1 is 1 at every step of every schedule; VAR's cfg=4 is scale 5
    assert guidance.var_ramp(5.0)(0.5) == 3.0
    assert all(guidance.SCHEDULES[name](1.0)(t) == 1.0 for name in guidance.SCHEDULES for t in (0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplerConfig(cfg_schedule="cosine-ish")


def test_non_finite_logits_and_bad_labels_raise():
    model = tiny()
    with torch.no_grad():
        model.output.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        generate(model, torch.tensor([0]))
    with pytest.raises(ValueError, match="class ids must be in"):
        generate(tiny(), torch.tensor([9]))


def test_autoguidance_adds_the_contrast_with_the_guide_on_top_of_cfg():
    g = torch.Generator().manual_seed(0)
    cond, uncond, guide = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    cfg = values.guide_rows(torch.cat([cond, uncond]), torch.tensor([2.0, 2.0, 1.0]))
    out = values.autoguide_rows(cfg, cond, guide, torch.tensor([3.0, 1.0, 3.0]))
    assert torch.allclose(out[0], cond[0] + (cond[0] - uncond[0]) + 2 * (cond[0] - guide[0]))
    assert torch.equal(out[1], cfg[1])  # guide scale 1: the CFG logits, bit for bit
    assert torch.allclose(out[2], guide[2] + 3 * (cond[2] - guide[2]))  # alone: CFG's formula, the guide for uncond


def test_one_cfg_formula_per_sample_or_per_position():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    both = torch.cat([cond, uncond])
    per_sample = guidance.guide_rows(both, torch.tensor([2.0, 1.0]))
    assert torch.allclose(per_sample[0], uncond[0] + 2 * (cond[0] - uncond[0])) and torch.equal(per_sample[1], cond[1])
    per_position = guidance.guide_rows(both, torch.tensor([[1.0, 2.0, 3.0]]))  # (1, n): every sample alike
    assert torch.equal(per_position[:, 0], cond[:, 0])  # scale 1: the conditional logits, bit for bit
    assert torch.allclose(per_position[:, 2], uncond[:, 2] + 3 * (cond[:, 2] - uncond[:, 2]))
    assert torch.equal(
        guidance.guide_rows(both, torch.tensor([[2.0, 2.0, 2.0]] * 2)),
        guidance.guide_rows(both, torch.tensor([2.0, 2.0])),
    )
    with pytest.raises(ValueError, match="do not fit 2 samples"):
        guidance.guide_rows(both, torch.tensor([1.0, 2.0, 3.0]))  # (n,) per position needs its row dimension


def test_autoguidance_settings_are_checked():
    with pytest.raises(ConfigError, match="guide_scale must be >= 0"):
        SamplerConfig(guide_scale=-1.0)
    assert SamplerConfig(guide_scale=2.0).flat()["guide_scale"] == 2.0
    model = tiny()
    config = SamplerConfig.from_flat({"guide_scale": 2.0, "speculative": "sjd"})
    with pytest.raises(ConfigError, match="not combined with speculative decoding yet: set guide_scale=1"):
        generate(model, torch.tensor([0]), config, guide_model=tiny())
