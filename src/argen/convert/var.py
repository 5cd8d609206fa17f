"""Official VAR checkpoints (`vae_ch160v4096z32.pth`, `var_d{16,20,24,30}.pth`) -> argen modules.

The transformer's parameter names match VAR's exactly. The tokenizer's quantiser names match too; its conv
encoder/decoder are argen's shared ones (identical math), so their keys are renamed here, and VAR's fused
`qkv` attention convolution is split into q, k, v. Every official key must be consumed exactly once.
"""

from __future__ import annotations

import os
import re

import torch

from argen.convert.llamagen import read_state_dict
from argen.models.next_scale import NextScaleConfig, NextScaleTransformer
from argen.pretrained import load_state_dict_strict
from argen.tokenizers.multiscale import MultiScaleVQ, MultiScaleVQConfig

# VAR_vae_ch160v4096z32 as released (256x256 RGB, 10 scales).
VAR_VAE_256 = MultiScaleVQConfig()


def _rename(key: str, num_levels: int) -> str:
    for part in ("encoder", "decoder"):
        key = key.replace(f"{part}.mid.block_1.", f"{part}.mid.0.").replace(f"{part}.mid.attn_1.", f"{part}.mid.1.")
        key = key.replace(f"{part}.mid.block_2.", f"{part}.mid.2.")
    m = re.match(r"encoder\.down\.(\d+)\.(block|attn|downsample)\.(.*)", key)
    if m:
        return f"encoder.conv_blocks.{m[1]}.{'res' if m[2] == 'block' else m[2]}.{m[3]}"
    m = re.match(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)", key)
    if m:  # VAR indexes decoder levels by resolution (up.{n-1} runs first); argen lists them in running order
        return f"decoder.conv_blocks.{num_levels - 1 - int(m[1])}.{'res' if m[2] == 'block' else m[2]}.{m[3]}"
    return key


def vqvae_state_dict(official: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in official.items():
        new = _rename(key, num_levels)
        if ".qkv." in new:  # fused (3C, C, 1, 1) in the order q, k, v
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[new.replace(".qkv.", f".{name}.")] = part
        else:
            out[new] = value
    return out


def load_vqvae(path: str | os.PathLike, config: MultiScaleVQConfig = VAR_VAE_256) -> MultiScaleVQ:
    official = read_state_dict(path, prefer=("model", "state_dict"))
    model = MultiScaleVQ(config)
    load_state_dict_strict(model, vqvae_state_dict(official, len(config.ch_mult)), source=str(path))
    return model.eval()


def transformer_config(fields: dict, token_dim: int, vocab_size: int) -> NextScaleConfig:
    """Official `VAR(...)` constructor arguments -> NextScaleConfig (shared_aln=False only)."""
    if fields.get("shared_aln", False):
        raise ValueError("VAR checkpoints with shared_aln=True are not supported")
    return NextScaleConfig(
        vocab_size=vocab_size,
        num_classes=fields["num_classes"],
        scales=tuple(fields["patch_nums"]),
        token_dim=token_dim,
        depth=fields["depth"],
        dim=fields["embed_dim"],
        num_heads=fields["num_heads"],
        mlp_ratio=fields.get("mlp_ratio", 4.0),
        norm_eps=fields.get("norm_eps", 1e-6),
        attn_l2_norm=fields.get("attn_l2_norm", True),
        class_dropout=fields.get("cond_drop_rate", 0.1),
    )


def load_transformer(path: str | os.PathLike, config: NextScaleConfig) -> NextScaleTransformer:
    model = NextScaleTransformer(config)
    load_state_dict_strict(model, read_state_dict(path, prefer=("model", "state_dict")), source=str(path))
    return model.eval()
