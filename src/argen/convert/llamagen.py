"""Official LlamaGen class-conditional checkpoints (`c2i_*.pt`, `vq_ds16_c2i.pt`) -> argen modules.

Parameter names already match, so conversion is: unwrap the state_dict, drop the legacy non-weight keys
the official loader ignores, map the official config fields, load strictly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from argen.models.raster import RasterConfig, RasterTransformer
from argen.pretrained import load_safetensors, load_state_dict_strict
from argen.tokenizers.vq import VQConfig, VQTokenizer

# Older GPT checkpoints carry these buffers; they are recomputed from the config.
LEGACY_GPT_KEYS = ("freqs_cis", "causal_mask")


def read_state_dict(path: str | os.PathLike, prefer: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a `.pt`/`.pth` file loaded with weights_only=True (no code is unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a non-tensor object, truncated zip, ...
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in prefer:
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: no state_dict found under {list(prefer)} (keys: {list(obj)[:10]})")


def raster_config(fields: dict[str, Any], grid_size: int | None = None) -> RasterConfig:
    """Official `ModelArgs` fields (dim, n_layer, n_head, ...) -> RasterConfig."""
    if fields.get("model_type", "c2i") != "c2i":
        raise ValueError(f"only class-conditional (c2i) LlamaGen models are supported, got {fields['model_type']!r}")
    if fields.get("cls_token_num", 1) != 1:
        raise ValueError("only cls_token_num=1 is supported")
    block = fields.get("block_size", 256)
    return RasterConfig(
        vocab_size=fields.get("vocab_size", 16384),
        num_classes=fields.get("num_classes", 1000),
        grid_size=grid_size or int(round(block**0.5)),
        dim=fields["dim"],
        num_layers=fields["n_layer"],
        num_heads=fields["n_head"],
        num_kv_heads=fields.get("n_kv_head"),
        multiple_of=fields.get("multiple_of", 256),
        ffn_dim_multiplier=fields.get("ffn_dim_multiplier"),
        rope_base=fields.get("rope_base", 10000),
        norm_eps=fields.get("norm_eps", 1e-5),
        class_dropout=fields.get("class_dropout_prob", 0.1),
    )


def load_gpt(path: str | os.PathLike, config: RasterConfig) -> RasterTransformer:
    state = read_state_dict(path, prefer=("model", "module", "state_dict"))
    state = {k: v for k, v in state.items() if k not in LEGACY_GPT_KEYS and ".kv_cache." not in k}
    model = RasterTransformer(config)
    load_state_dict_strict(model, state, source=str(path))
    return model.eval()


def load_vq(path: str | os.PathLike, config: VQConfig) -> VQTokenizer:
    state = read_state_dict(path, prefer=("ema", "model", "state_dict"))
    model = VQTokenizer(config)
    load_state_dict_strict(model, state, source=str(path))
    return model.eval()
