"""The KL tokenizer against MAR's official AutoencoderKL (../shared/parity/MAR_*), and its own round trips."""

import dataclasses

import pytest
import torch

from argen.convert.mar import load_kl
from argen.errors import ConfigError
from argen.pretrained import load_pretrained
from argen.tokenizers.kl import KLConfig, KLTokenizer
from tests.conftest import PARITY, assert_close_ref

# The fixture's tokenizer: AutoencoderKL(embed_dim=16) with its encoder/decoder rebuilt at ch=32.
FIXTURE = KLConfig(image_size=64, embed_dim=16, ch=32, ch_mult=(1, 1, 2, 2, 1))


@pytest.fixture(scope="module")
def official(mar_fixture):
    return load_kl(PARITY / "MAR_tokenizer.safetensors", FIXTURE)


@torch.no_grad()
def test_posterior_parity(official, mar_fixture):
    _, ref, meta, _ = mar_fixture
    moments = official.moments(ref["f.image"])
    assert_close_ref(moments, "f.moments", ref, meta)
    posterior = official.posterior(ref["f.image"])
    assert_close_ref(posterior.mean, "f.mean", ref, meta)
    assert_close_ref(posterior.std, "f.std", ref, meta)
    sample = posterior.sample(ref["f.draw000_randn"]) * official.config.scale_factor
    assert_close_ref(sample, "f.posterior_sample_scaled", ref, meta)


@torch.no_grad()
def test_decode_parity(official, mar_fixture):
    _, ref, meta, _ = mar_fixture
    assert_close_ref(official.decode_unscaled(ref["f.mean"]), "f.decode_mean", ref, meta)
    # decode() takes the generator's scaled latents
    assert_close_ref(official.decode(ref["f.mean"] * 0.2325), "f.decode_mean", ref, meta)


def test_official_key_set_loads_strictly(official, mar_fixture):
    from argen.convert.var import vqvae_state_dict

    keys = set(vqvae_state_dict(mar_fixture[0]["tokenizer"], 5))
    assert keys == set(official.state_dict())  # every official key, the 38 invisible biases included


def tiny_kl() -> KLTokenizer:
    torch.manual_seed(0)
    return KLTokenizer(KLConfig(image_size=8, image_channels=1, embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1))


def test_save_load_and_seeded_encode(tmp_path):
    model = tiny_kl().eval()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    model.save_pretrained(tmp_path / "kl")
    loaded = load_pretrained(tmp_path / "kl")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert torch.equal(model.encode(images, g1, sample=True), loaded.encode(images, g2, sample=True))
        assert torch.equal(model.encode(images), loaded.encode(images))  # the posterior means: no randomness
        latents = model.latents(images)
        assert latents.shape == (2, 4, 4, 4)
        assert model.decode(latents).shape == images.shape


def test_training_loss_falls():
    model = tiny_kl().train()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        out = model(images)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.kl.item() >= 0 and losses[-1] < 0.5 * losses[0], losses


def test_training_loss_falls_through_the_loop(tmp_path):
    """The KL tokenizer trains through the one loop (AutoencoderTask): reconstruction + KL falls on real digits,
    and the run leaves a loadable tokenizer."""
    import json

    from argen.data.datasets import ArrayDataset, mnist_pixels
    from argen.train.loop import TrainConfig, train
    from argen.train.tasks import AutoencoderTask

    pixels, labels = mnist_pixels()
    data = ArrayDataset(pixels[:64], labels[:64], [str(i) for i in range(10)])
    torch.manual_seed(0)
    model = KLTokenizer(
        KLConfig(image_size=28, image_channels=1, embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    )
    config = TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=2, ema_decay=0, save_every=0, log_every=5)
    result = train(AutoencoderTask(model, data.images[:4]), data, config, tmp_path / "run", device="cpu")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses
    assert isinstance(load_pretrained(result.output), KLTokenizer)


def test_tokens_are_latent_positions_in_raster_order():
    model = tiny_kl().eval()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        latents = model.latents(images)  # (B, D, h, w)
        tokens = model.encode(images)  # what a generator reads: (B, L, D)
        assert torch.equal(tokens, model.to_tokens(latents))
        assert tokens.shape == (2, model.seq_len, model.token_dim)
        assert torch.equal(tokens[:, 1], latents[:, :, 0, 1])  # position (0, 1) is token 1
        assert torch.equal(model.from_tokens(tokens), latents)
        assert torch.equal(model.decode(tokens), model.decode(latents))
        assert torch.allclose(model.unscaled_tokens(images) * model.config.scale_factor, tokens)


@torch.no_grad()
def test_a_per_channel_shift_and_scale_standardise_and_decode_back(tmp_path):
    """Latents normalised per channel ((z - shift_c) * scale_c, what `argen tokenize --normalize channel` measures)
    decode to the images the posterior means decode to, and survive a save and load."""
    model = tiny_kl().eval()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    means = model.posterior(images).mean  # (3, 4, 4, 4)
    shift, std = means.mean((0, 2, 3)), means.std((0, 2, 3), unbiased=False)
    model.config = dataclasses.replace(model.config, scale_factor=(1 / std).tolist(), latent_shift=shift.tolist())
    latents = model.latents(images)
    assert torch.allclose(latents.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(latents.std((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.allclose(model.decode(latents), model.decode_unscaled(means), atol=1e-5)
    assert torch.allclose(model.decode(model.encode(images)), model.decode_unscaled(means), atol=1e-5)  # tokens
    model.save_pretrained(tmp_path / "kl")
    assert torch.equal(load_pretrained(tmp_path / "kl").latents(images), latents)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scale_factor": [1.0, 2.0]}, "one per channel"),
        ({"scale_factor": [1.0, 0.0, 1.0, 1.0]}, "one per channel"),
        ({"latent_shift": [0.0, 1.0, 2.0]}, "latent_shift"),
        ({"latent_shift": [0.0, float("nan"), 0.0, 0.0]}, "latent_shift"),
    ],
)
def test_per_channel_normalisation_must_fit_the_channels(fields, message):
    with pytest.raises(ConfigError, match=message):
        KLConfig(image_size=8, image_channels=1, embed_dim=4, ch=32, ch_mult=(1, 2), **fields)
