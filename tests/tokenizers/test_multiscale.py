import pytest
import torch

from argen.convert.var import load_vqvae
from argen.errors import ConfigError
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


def test_prefix_dropout_reconstructs_from_the_first_maps_and_trains_the_codes_directly():
    model = tiny().train()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    f = model.latent(x)
    kept = torch.tensor([1, 2, 3])  # 3 = every scale: the usual straight-through f_hat
    q = model.quantize(f, kept)
    with torch.no_grad():
        for b, k in enumerate(kept.tolist()):
            prefix = model.quantize.ids_to_fhat([ids[b : b + 1] for ids in q.ids], 4, upto=k - 1)
            assert torch.allclose(q.f_hat[b : b + 1], prefix, atol=1e-6)
    # A truncated image's reconstruction trains the codebook, not the encoder (no straight-through) ...
    model.zero_grad()
    model.decode_latent(model.quantize(model.latent(x), torch.tensor([1, 2, 2])).f_hat).sum().backward()
    assert model.encoder.conv_in.weight.grad is None or model.encoder.conv_in.weight.grad.abs().sum() == 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    # ... and a whole one the encoder, not the codebook (VAR's straight-through)
    model.zero_grad()
    model.decode_latent(model.quantize(model.latent(x), torch.tensor([3, 3, 3])).f_hat).sum().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0


def test_prefix_dropout_is_a_checked_training_only_setting():
    model = tiny()
    model.config.prefix_dropout = 1.0
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).ids, model.encode(x))
        # evaluation reconstructs from every map whatever the setting
        assert torch.allclose(model(x).reconstruction.clamp(-1, 1), model.decode(model.encode(x)), atol=1e-4)
    with pytest.raises(ConfigError, match="prefix_dropout"):
        MultiScaleVQConfig(image_size=16, ch_mult=(1, 2, 2), scales=(1, 2, 4), prefix_dropout=1.5)
    with pytest.raises(ConfigError, match="needs 2 scales"):  # no prefix to keep: it failed in the first step
        MultiScaleVQConfig(image_size=16, ch_mult=(1, 2, 2), scales=(4,), prefix_dropout=0.25)


@torch.no_grad()
def test_dead_codes_restart_onto_the_residuals_of_every_scale():
    """Drawn without replacement, a scale short of residuals passing its surplus to the next."""
    model = tiny().train()
    quantizer = model.quantize
    quantizer.ema_vocab_hit_SV.zero_()
    quantizer.ema_vocab_hit_SV[:, :2] = 1.0  # codes 0-1 alive, 30 dead
    quantizer.recorded = 100
    f = torch.randn(2, 4, 4, 4)
    pools = [rest.permute(0, 2, 3, 1).reshape(-1, 4) for _, rest, _, _ in quantizer._residual_quantise(f)]
    assert quantizer.restart_dead_codes(f, torch.Generator().manual_seed(0)) == 30
    homes = []
    for code in range(2, 32):
        row = quantizer.embedding.weight[code]
        homes.append([si for si, pool in enumerate(pools) if torch.isclose(pool, row[None]).all(1).any()])
    assert all(homes)  # each restarted code sits on a residual the quantiser rounds at some scale
    restarted = quantizer.embedding.weight[2:]
    assert len(torch.unique(restarted, dim=0)) == 30  # no two on one vector: they would tie in `nearest`
    # the coarse maps get their share (before, every code went onto a full-size latent vector, the last scale's):
    # all of the 1x1 map's 2 residuals and the 2x2 map's 8, which is what ~10 codes a scale ask of them
    assert sum(h == [0] for h in homes) == 2 and sum(h == [1] for h in homes) == 8
    assert quantizer.recorded == 0 and (quantizer.ema_vocab_hit_SV[:, 2:] > 0).all()
    with pytest.raises(ValueError, match=r"latent map \(B, C, h, w\)"):  # the old (N, C) vectors
        quantizer.restart_dead_codes(f.flatten(2).transpose(1, 2).flatten(0, 1))
