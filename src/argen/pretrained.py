"""Checkpoint folders: `config.json` + `model.safetensors`, rebuilt from the config and loaded strictly.

Every saveable component is an `nn.Module` with a `config` dataclass attribute and a class-level
`component_type` name. `save_pretrained` writes both files atomically; `load_pretrained` reads the
config, builds the registered class and loads the weights with strict key and shape checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from argen.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    NonFiniteCheckpointError,
    NonFiniteError,
    WrongComponentError,
)

# Re-exported: the rest of argen imports its atomic writer from here.
from argen.storage import atomic_write as atomic_write
from argen.storage import remove_stray_temp_files as remove_stray_temp_files

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_REGISTRY: dict[str, type[nn.Module]] = {}
# Modules whose classes register themselves; imported on first load so any folder can be opened.
_COMPONENT_MODULES = (
    "argen.tokenizers.vq",
    "argen.tokenizers.multiscale",
    "argen.tokenizers.kl",
    "argen.models.registry",  # every order's model file: a new order is registered there, not here
    "argen.eval.classifier",
)
M = TypeVar("M", bound=nn.Module)


def register(cls: type[M]) -> type[M]:
    """Class decorator: make `cls` loadable by its `component_type` name."""
    _REGISTRY[cls.component_type] = cls
    return cls


def config_from_dict(config_cls: type, fields: dict[str, Any]) -> Any:
    """Build a config dataclass, refusing unknown keys (a typo must not be silently ignored)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown {config_cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in fields:
            v = fields[f.name]
            # JSON has no tuples; configs use tuples for sequences so they stay hashable.
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return config_cls(**values)


def non_finite(tensors: dict[str, torch.Tensor], parameters: Iterable[str]) -> list[str]:
    """Names of tensors holding NaN, or holding infinity when they are parameters.

    Buffers may hold -inf on purpose (an additive attention mask); NaN is never legitimate anywhere.
    """
    parameters = set(parameters)
    bad = []
    for k, v in tensors.items():
        if v.is_floating_point() and not bool((torch.isfinite(v) if k in parameters else ~torch.isnan(v)).all()):
            bad.append(k)
    return bad


def describe_non_finite(tensors: dict[str, torch.Tensor], names: list[str]) -> str:
    """`'w' (12 of 64 values NaN or inf)`, for the first few `names`."""
    parts = [
        f"{k!r} ({int((~torch.isfinite(tensors[k])).sum())} of {tensors[k].numel()} values NaN or inf)"
        for k in names[:3]
    ]
    return ", ".join(parts) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, state_dict: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write `config.json` and `model.safetensors`. `dtype` (e.g. torch.float16) sets the storage type of float
    tensors, to ship small files; loading casts them back to the model's own dtype."""
    directory = Path(directory)
    config = {
        "format_version": FORMAT_VERSION,
        "component_type": model.component_type,
        "config": dataclasses.asdict(model.config),
    }
    state = state_dict if state_dict is not None else model.state_dict()
    bad = non_finite(state, (n for n, _ in model.named_parameters()))
    if bad:
        raise NonFiniteError(
            f"refusing to write non-finite weights to {directory}: {describe_non_finite(state, bad)}; "
            "the run diverged (lower the learning rate)"
        )
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _import_components() -> None:
    import importlib

    for name in _COMPONENT_MODULES:
        importlib.import_module(name)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    _import_components()
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found: a checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not an argen config (a JSON {type(config).__name__}, not an object)")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if config.get("component_type") not in _REGISTRY:
        raise CheckpointError(
            f"{path}: component_type {config.get('component_type')!r} is unknown; known: {sorted(_REGISTRY)}"
        )
    if not isinstance(config.get("config"), dict):
        raise CheckpointError(f"{path}: 'config' must be an object of constructor fields")
    return config


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from e


def _key_list(keys: list[str]) -> str:
    return f"({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}"


def check_state_dict(own: dict[str, torch.Tensor], loaded: dict[str, Any], source: str, target: str) -> None:
    """CheckpointError listing missing, unexpected and wrongly shaped keys of `loaded` against `own`."""
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    not_tensors = sorted(k for k in set(own) & set(loaded) if not isinstance(loaded[k], torch.Tensor))
    wrong = sorted(
        k for k in set(own) & set(loaded) - set(not_tensors) if tuple(own[k].shape) != tuple(loaded[k].shape)
    )
    if not (missing or unexpected or wrong or not_tensors):
        return
    lines = [f"{source} does not match {target}:"]
    if missing:
        lines.append(f"  missing keys {_key_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys {_key_list(unexpected)}")
    if not_tensors:
        lines.append(f"  not tensors {_key_list(not_tensors)}")
    for k in wrong[:20]:
        lines.append(f"  shape of {k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}")
    raise CheckpointError("\n".join(lines))


def check_finite_loaded(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """NonFiniteCheckpointError naming the tensors of a loaded state that hold NaN or infinity."""
    bad = non_finite(state_dict, (n for n, _ in model.named_parameters()))
    if bad:
        raise NonFiniteCheckpointError(
            f"{source} holds non-finite weights: {describe_non_finite(state_dict, bad)}; "
            "it is corrupt or was saved by a diverged run: use an earlier checkpoint"
        )


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with no missing or unexpected keys, identical shapes and finite values; floats are cast to the
    model's dtype."""
    own = model.state_dict()
    check_state_dict(own, state_dict, source, type(model).__name__)
    check_finite_loaded(model, state_dict, source)
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)


def load_pretrained(directory: str | os.PathLike, expected_type: type[M] | None = None) -> M:
    """Rebuild a component from its folder and load its weights strictly; returns it in eval mode."""
    directory = Path(directory)
    config = read_config(directory)
    cls = _REGISTRY[config["component_type"]]
    if expected_type is not None and not issubclass(cls, expected_type):
        raise WrongComponentError(
            f"{directory} holds a {config['component_type']!r}, not a {expected_type.component_type!r}"
        )
    try:
        model = cls(config_from_dict(cls.config_class, config["config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from e
    load_state_dict_strict(model, load_safetensors(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
    return model.eval()


class Pretrained:
    """Mixin giving a registered module `save_pretrained(dir)` and `Class.from_pretrained(dir)`."""

    component_type: str = ""
    config_class: type = object

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        return save_pretrained(self, directory, dtype=dtype)

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike) -> M:
        return load_pretrained(directory, expected_type=cls)
