import math

import numpy as np
import torch

from argen.data.datasets import ArrayDataset
from argen.eval.tokenizer import evaluate_tokenizer, psnr_from_mse
from argen.tokenizers.multiscale import MultiScaleVQ, MultiScaleVQConfig
from argen.tokenizers.vq import VQConfig, VQTokenizer


def test_psnr_of_known_errors():
    assert psnr_from_mse(0.01) == 20.0
    assert psnr_from_mse(1e-4) == 40.0
    assert math.isinf(psnr_from_mse(0.0))


def test_report_matches_a_direct_computation():
    torch.manual_seed(0)
    tok = VQTokenizer(
        VQConfig(
            image_size=8,
            image_channels=1,
            codebook_size=8,
            codebook_embed_dim=4,
            ch=32,
            encoder_ch_mult=(1, 2),
            decoder_ch_mult=(1, 2),
            num_res_blocks=1,
            z_channels=4,
        )
    )
    pixels = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    data = ArrayDataset(pixels, np.zeros(10), ["x"])
    report = evaluate_tokenizer(tok, data, batch_size=3)
    with torch.no_grad():
        ids = tok.eval().encode(data.images)
        recon = tok.decode(ids).clamp(-1, 1)
    mse = ((recon - data.images) / 2).pow(2).mean().item()
    assert report.num_images == 10 and abs(report.mse - mse) < 1e-7
    used = len(torch.unique(ids))
    assert report.codebook_usage == used / 8
    assert 1.0 <= report.codebook_perplexity <= used + 1e-6
    assert report.scale_perplexity is None  # one map


def test_multiscale_report_gives_each_scale_its_perplexity():
    torch.manual_seed(0)
    tok = MultiScaleVQ(
        MultiScaleVQConfig(
            image_size=16, image_channels=1, codebook_size=32, z_channels=4, ch=32, ch_mult=(1, 2, 2), scales=(1, 2, 4)
        )
    )
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    data = ArrayDataset(pixels, np.zeros(12), ["x"])
    report = evaluate_tokenizer(tok, data, batch_size=5)
    with torch.no_grad():
        maps = tok.eval().split(tok.encode(data.images))
    assert [pn for pn, _ in report.scale_perplexity] == [1, 2, 4]
    for (_, value), ids in zip(report.scale_perplexity, maps, strict=True):
        p = torch.bincount(ids.flatten()).double() / ids.numel()
        assert math.isclose(value, math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()), rel_tol=1e-9)
