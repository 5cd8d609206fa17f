import pytest
import torch

from argen.convert.llamagen import load_vq
from argen.tokenizers.vq import USAGE_WINDOW, VQConfig, VQTokenizer
from tests.conftest import PARITY, assert_close_ref, tiny_vq

FIXTURE_VQ = VQConfig(
    image_size=64,
    image_channels=3,
    codebook_size=512,
    codebook_embed_dim=8,
    ch=32,
    encoder_ch_mult=(1, 1, 2, 2, 1),
    decoder_ch_mult=(1, 1, 2, 2, 1),
    z_channels=32,
)


@pytest.fixture(scope="module")
def official_vq(llamagen_fixture):
    return load_vq(PARITY / "LlamaGen_tokenizer.safetensors", FIXTURE_VQ)


@torch.no_grad()
def test_llamagen_tokenizer_parity(official_vq, llamagen_fixture):
    _, ref, meta, _ = llamagen_fixture
    h = official_vq.latent(ref["tok_image"])
    assert_close_ref(h, "tok_h", ref, meta)
    q = official_vq.quantize(h)
    assert_close_ref(q.quantized, "tok_quant", ref, meta)
    assert_close_ref(q.ids, "tok_codes", ref, meta)
    assert_close_ref(official_vq.encode(ref["tok_image"]), "tok_codes", ref, meta)
    assert_close_ref(official_vq.decode(ref["tok_codes"]), "tok_recon", ref, meta)


def test_fixture_key_set_is_exactly_ours(llamagen_fixture):
    weights = llamagen_fixture[0]["tokenizer"]
    assert set(weights) == set(VQTokenizer(FIXTURE_VQ).state_dict())
    assert len(weights) == 344


def tiny() -> VQTokenizer:
    return tiny_vq()


def test_shapes_and_straight_through_gradient():
    model = tiny()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.ids.shape == (3, 64)
    out.loss.backward()
    # The straight-through estimator lets the reconstruction loss reach the encoder.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_quantizer_picks_nearest_normalised_code():
    model = tiny().eval()
    z = torch.randn(2, 4, 3, 3)
    q = model.quantize(z)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = flat @ model.quantize.codebook().t()
    assert torch.equal(q.ids.reshape(-1), cos.argmax(1))


def test_usage_tracking_and_dead_code_restart():
    model = tiny().train()
    quantizer = model.quantize
    # Force every latent to code 3: all other codes are dead.
    with torch.no_grad():
        quantizer.embedding.weight[3] = 10.0
    z = quantizer.embedding.weight[3].detach().repeat(4 * 16 * 16, 1).view(4, 16, 16, 4).permute(0, 3, 1, 2)
    quantizer(z)
    usage = quantizer.usage()
    assert usage[3] == 4 * 16 * 16 and usage.sum() == 4 * 16 * 16
    latents = torch.randn(4, 4, 5, 5)
    restarted = quantizer.restart_dead_codes(latents, torch.Generator().manual_seed(0))
    latents = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    assert restarted == 15
    rows = quantizer.embedding.weight.detach()
    normed = torch.nn.functional.normalize(latents, dim=-1)
    for code in range(16):
        if code != 3:  # each restarted code now sits exactly on one of the batch latents
            assert torch.isclose(rows[code][None], normed, atol=1e-6).all(1).any()
    assert quantizer.codebook_used.shape == (USAGE_WINDOW,)


def test_bad_input_shapes_raise():
    model = tiny()
    with pytest.raises(ValueError, match="images must be"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="ids must be"):
        model.decode(torch.zeros(1, 10, dtype=torch.long))
