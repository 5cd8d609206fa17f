import numpy as np
import torch

from argen.data.datasets import ArrayDataset
from argen.data.shards import TokenShards, write_shards
from tests.conftest import tiny_vq


def test_shards_round_trip_equals_direct_encoding(tmp_path):
    tokenizer = tiny_vq(codebook_size=32)
    pixels = np.random.default_rng(0).integers(0, 256, (23, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(23) % 3
    data = ArrayDataset(pixels, labels, ["a", "b", "c"])
    write_shards(tokenizer, data, tmp_path, batch_size=5, shard_size=10)
    shards = TokenShards(tmp_path)
    assert len(shards) == 23 and len(shards.meta["shards"]) == 3
    assert shards.seq_len == 64 and shards.class_names == ["a", "b", "c"]
    with torch.no_grad():
        direct = tokenizer.eval().encode(data.images)
    got = torch.stack([shards[i][0] for i in range(23)])
    assert torch.equal(got, direct)
    assert [shards[i][1].item() for i in range(23)] == labels.tolist()
    assert isinstance(shards.tokens[0], np.memmap)


def tiny_kl_tokenizer():
    from argen.tokenizers.kl import KLConfig, KLTokenizer

    torch.manual_seed(0)
    return KLTokenizer(KLConfig(image_size=16, image_channels=1, embed_dim=3, ch=32, ch_mult=(1, 2), num_res_blocks=1))


def test_latent_shards_round_trip_float16_memmap(tmp_path):
    """A KL tokenizer's shards hold its unscaled posterior means as float16 (n, L, D) memmaps; reading them applies
    the scale factor measured at tokenize time (one over their std), so what a generator sees has unit std."""
    tokenizer = tiny_kl_tokenizer().eval()
    pixels = np.random.default_rng(0).integers(0, 256, (23, 16, 16, 1), dtype=np.uint8)
    data = ArrayDataset(pixels, np.arange(23) % 3, ["a", "b", "c"])
    write_shards(tokenizer, data, tmp_path, batch_size=5, shard_size=10)
    shards = TokenShards(tmp_path)
    assert shards.values == "continuous" and len(shards) == 23 and len(shards.meta["shards"]) == 3
    assert (shards.seq_len, shards.token_dim) == (64, 3)
    assert all(isinstance(t, np.memmap) and t.dtype == np.float16 and t.shape[1:] == (64, 3) for t in shards.tokens)
    with torch.no_grad():
        direct = tokenizer.unscaled_tokens(data.images)  # (23, 64, 3)
    stored = torch.from_numpy(np.concatenate(shards.tokens).astype(np.float32))
    assert torch.allclose(stored, direct, rtol=1e-3, atol=1e-5)  # float16 of the values (other batch sizes)
    assert abs(shards.scale_factor - 1 / direct.double().std(unbiased=False).item()) < 1e-3 * shards.scale_factor
    got = torch.stack([shards[i][0] for i in range(23)])
    assert got.dtype == torch.float32 and got.shape == (23, 64, 3)
    assert torch.allclose(got, stored * shards.scale_factor)
    assert abs(got.std(unbiased=False).item() - 1.0) < 1e-2


def test_an_order_on_the_other_kind_of_shards_is_a_clear_error(tmp_path):
    import pytest

    from argen.errors import ConfigError
    from argen.models.mar import MARTransformer
    from argen.models.raster import RasterTransformer

    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    data = ArrayDataset(pixels, np.arange(6) % 2, ["a", "b"])
    latents = TokenShards(write_shards(tiny_kl_tokenizer(), data, tmp_path / "latents"))
    ids = TokenShards(write_shards(tiny_vq(), data, tmp_path / "ids"))
    latents.check_order(MARTransformer.order)
    ids.check_order(RasterTransformer.order)
    with pytest.raises(ConfigError, match="holds continuous tokens, but the raster order models discrete"):
        latents.check_order(RasterTransformer.order)
    with pytest.raises(ConfigError, match="holds discrete tokens, but the mar order models continuous"):
        ids.check_order(MARTransformer.order)


def test_latent_shards_standardised_per_channel(tmp_path):
    """`per_channel`: each channel's mean and std are measured at tokenize time and the values read are
    (latent - mean_c) / std_c: mean 0 and std 1 in every channel, where one scale factor leaves channels apart."""
    tokenizer = tiny_kl_tokenizer().eval()
    pixels = np.random.default_rng(0).integers(0, 256, (23, 16, 16, 1), dtype=np.uint8)
    data = ArrayDataset(pixels, np.arange(23) % 3, ["a", "b", "c"])
    write_shards(tokenizer, data, tmp_path, batch_size=5, shard_size=10, per_channel=True)
    shards = TokenShards(tmp_path)
    assert len(shards.scale_factor) == 3 and len(shards.latent_shift) == 3
    stored = torch.from_numpy(np.concatenate(shards.tokens).astype(np.float32))  # (23, 64, 3)
    assert torch.allclose(torch.tensor(shards.latent_shift), stored.double().mean((0, 1)).float(), atol=1e-4)
    got = torch.stack([shards[i][0] for i in range(23)])
    assert torch.allclose(got.mean((0, 1)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(got.std((0, 1), unbiased=False), torch.ones(3), atol=1e-3)
