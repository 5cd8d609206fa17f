import pytest
import torch

from argen.convert.var import load_vqvae
from argen.tokenizers.multiscale import MultiScaleVQ, MultiScaleVQConfig, SharedPhi
from tests.conftest import PARITY, assert_close_ref

FIXTURE = MultiScaleVQConfig(
    image_size=64,
    image_channels=3,
    codebook_size=1024,
    z_channels=16,
    ch=32,
    ch_mult=(1, 1, 2, 2, 1),
    scales=(1, 2, 3, 4),
)


@pytest.fixture(scope="module")
def official_vq(var_fixture):
    return load_vqvae(PARITY / "VAR_tokenizer.safetensors", FIXTURE)


@torch.no_grad()
def test_var_tokenizer_parity(official_vq, var_fixture):
    _, ref, meta, _ = var_fixture
    f = official_vq.latent(ref["tok_image"])
    assert_close_ref(f, "tok_f", ref, meta)
    ids = official_vq.quantize(f).ids
    for s in range(4):
        assert_close_ref(ids[s], f"tok_idx_s{s}", ref, meta)
        assert_close_ref(official_vq.quantize.ids_to_fhat(ids, 4, upto=s), f"tok_fhat_s{s}", ref, meta)
    assert_close_ref(official_vq.decode_latent(ref["tok_fhat_s3"]), "tok_recon", ref, meta)
    assert_close_ref(official_vq.quantize.next_scale_inputs(ids, 4), "tf_x_BLCv_wo_first_l", ref, meta)
    assert torch.equal(official_vq.encode(ref["tok_image"]), torch.cat(ids, 1))


def test_phi_index_of_the_released_ten_scales():
    phi = SharedPhi(4, 0.5, 4)
    assert [phi.index(s, 10) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi.index(s, 4) for s in range(4)] == [0, 1, 2, 3]


def tiny() -> MultiScaleVQ:
    torch.manual_seed(0)
    return MultiScaleVQ(
        MultiScaleVQConfig(
            image_size=16,
            image_channels=1,
            codebook_size=32,
            z_channels=4,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            scales=(1, 2, 4),
        )
    )


def test_training_forward_round_trip_and_gradients():
    model = tiny()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = model(x)
    assert out.ids.shape == (3, 21) and out.reconstruction.shape == x.shape
    out.loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        ids = model.encode(x)
        split = model.split(ids)
        assert [t.shape[1] for t in split] == [1, 4, 16]
        # decode == decoder(f_hat accumulated from the ids), and ids_to_fhat with all scales is the quantiser's f_hat
        f_hat = model.quantize(model.latent(x)).f_hat
        assert torch.allclose(model.quantize.ids_to_fhat(split, 4), f_hat, atol=1e-5)
        assert torch.allclose(model.decode(ids), model.decode_latent(f_hat), atol=1e-5)
    with pytest.raises(ValueError, match="last scale must equal"):
        MultiScaleVQConfig(image_size=16, ch_mult=(1, 2, 2), scales=(1, 2, 3))
