"""The one registry of tokenizer kinds: name -> tokenizer class, with its presets (as `models/registry.py` is for
generation orders). What a kind trains with follows from the class itself: `values` says whether its tokens are
codebook ids (a VQ objective with dead-code restarts) or continuous latents (reconstruction + KL)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from argen.errors import ConfigError, WrongComponentError
from argen.pretrained import load_pretrained, read_config
from argen.tokenizers.kl import KL_PRESETS, KLTokenizer
from argen.tokenizers.multiscale import MULTISCALE_PRESETS, MultiScaleVQ
from argen.tokenizers.vq import VQ_PRESETS, VQTokenizer

# name -> (tokenizer class, presets: preset name -> config)
TOKENIZERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vq": (VQTokenizer, VQ_PRESETS),
    "multiscale": (MultiScaleVQ, MULTISCALE_PRESETS),
    "kl": (KLTokenizer, KL_PRESETS),
}


def presets() -> dict[str, Any]:
    """Every tokenizer preset: preset name -> config."""
    return {preset: config for _, table in TOKENIZERS.values() for preset, config in table.items()}


def build(config: Any) -> nn.Module:
    """A fresh tokenizer of the kind whose config this is."""
    for cls, _ in TOKENIZERS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise ConfigError(f"{type(config).__name__} is not the config of any tokenizer ({sorted(TOKENIZERS)})")


def load(directory: str | os.PathLike) -> nn.Module:
    """A saved tokenizer of any kind; a folder holding anything else (a generator, a classifier) is refused with
    what it holds, before any weights are read."""
    kinds = {cls.component_type: name for name, (cls, _) in TOKENIZERS.items()}
    held = read_config(directory)["component_type"]
    if held not in kinds:
        raise WrongComponentError(f"{directory} holds a {held!r}, not a tokenizer (one of {sorted(kinds)})")
    return load_pretrained(directory)
