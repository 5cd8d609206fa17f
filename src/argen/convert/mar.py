"""Official MAR checkpoints (LTH14/mar: `kl16.ckpt`, `mar_{base,large,huge}/checkpoint-last.pth`) -> argen modules.

The generator's parameter names match MAR's exactly (`MAR`, `DiffLoss`, `SimpleMLPAdaLN`), so conversion is:
unwrap the state dict (released files keep it under `model_ema`, the EMA weights the paper samples with, and
`model`), map the constructor arguments, load strictly. The KL tokenizer's conv encoder/decoder are argen's
shared ones in the same taming layout as VAR's VQ-VAE, so their keys are renamed as VAR's are. Files are read
with weights-only unpickling.
"""

from __future__ import annotations

import os
from typing import Any

from argen.convert.llamagen import read_state_dict
from argen.convert.var import vqvae_state_dict
from argen.models.mar import MARConfig, MARTransformer
from argen.pretrained import load_state_dict_strict
from argen.tokenizers.kl import KLConfig, KLTokenizer

# MAR's released KL-16: AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)) on 256x256 RGB.
MAR_KL16 = KLConfig()


def load_kl(path: str | os.PathLike, config: KLConfig = MAR_KL16) -> KLTokenizer:
    """`kl16.ckpt` (state dict under `model`) or a safetensors file in the official layout -> KLTokenizer."""
    official = read_state_dict(path, prefer=("model", "state_dict"))
    model = KLTokenizer(config)
    load_state_dict_strict(model, vqvae_state_dict(official, len(config.ch_mult)), source=str(path))
    return model.eval()


def transformer_config(fields: dict[str, Any]) -> MARConfig:
    """Official `MAR(...)` constructor arguments (`mar_base` etc. fill the sizes) -> MARConfig."""
    if fields.get("img_size", 256) % (fields.get("vae_stride", 16) * fields.get("patch_size", 1)):
        raise ValueError(f"img_size {fields.get('img_size')} is not a multiple of vae_stride * patch_size")
    return MARConfig(
        num_classes=fields.get("class_num", 1000),
        latent_size=fields.get("img_size", 256) // fields.get("vae_stride", 16),
        latent_channels=fields.get("vae_embed_dim", 16),
        patch_size=fields.get("patch_size", 1),
        encoder_dim=fields["encoder_embed_dim"],
        encoder_depth=fields["encoder_depth"],
        encoder_heads=fields["encoder_num_heads"],
        decoder_dim=fields["decoder_embed_dim"],
        decoder_depth=fields["decoder_depth"],
        decoder_heads=fields["decoder_num_heads"],
        mlp_ratio=float(fields.get("mlp_ratio", 4.0)),
        buffer_size=fields.get("buffer_size", 64),
        mask_ratio_min=fields.get("mask_ratio_min", 0.7),
        class_dropout=fields.get("label_drop_prob", 0.1),
        attn_dropout=fields.get("attn_dropout", 0.1),
        proj_dropout=fields.get("proj_dropout", 0.1),
        head_depth=fields.get("diffloss_d", 3),
        head_width=fields.get("diffloss_w", 1024),
        diffusion_batch_mul=fields.get("diffusion_batch_mul", 4),
    )


def load_transformer(path: str | os.PathLike, config: MARConfig, ema: bool = True) -> MARTransformer:
    """A released checkpoint -> MARTransformer; `ema` prefers the `model_ema` weights (the ones MAR samples
    with), else `model`."""
    prefer = ("model_ema", "model", "state_dict") if ema else ("model", "state_dict")
    model = MARTransformer(config)
    load_state_dict_strict(model, read_state_dict(path, prefer=prefer), source=str(path))
    return model.eval()
