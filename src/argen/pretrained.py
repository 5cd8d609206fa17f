"""Checkpoint folders: `config.json` + `model.safetensors`, rebuilt from the config and loaded strictly.

Every saveable component is an `nn.Module` with a `config` dataclass attribute and a class-level
`component_type` name. `save_pretrained` writes both files atomically; `load_pretrained` reads the
config, builds the registered class and loads the weights with strict key and shape checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_REGISTRY: dict[str, type[nn.Module]] = {}
# Modules whose classes register themselves; imported on first load so any folder can be opened.
_COMPONENT_MODULES = (
    "argen.tokenizers.vq",
    "argen.tokenizers.multiscale",
    "argen.models.raster",
    "argen.models.next_scale",
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
        raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in fields:
            v = fields[f.name]
            # JSON has no tuples; configs use tuples for sequences so they stay hashable.
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return config_cls(**values)


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary readable files
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stray_temp_files(folder: Path) -> int:
    """Delete temp files left by a writer that was killed mid-write; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stray = list(folder.glob(".*.tmp"))
    for p in stray:
        p.unlink()
    return len(stray)


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
        raise FileNotFoundError(f"{path} not found: a checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if config.get("component_type") not in _REGISTRY:
        raise ValueError(
            f"{path}: component_type {config.get('component_type')!r} is unknown; known: {sorted(_REGISTRY)}"
        )
    return config


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from e


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with no missing or unexpected keys and identical shapes; floats are cast to the model's dtype."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        lines = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )
        for k in wrong[:20]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}")
        raise ValueError("\n".join(lines))
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)


def load_pretrained(directory: str | os.PathLike, expected_type: type[M] | None = None) -> M:
    """Rebuild a component from its folder and load its weights strictly; returns it in eval mode."""
    directory = Path(directory)
    config = read_config(directory)
    cls = _REGISTRY[config["component_type"]]
    if expected_type is not None and not issubclass(cls, expected_type):
        raise TypeError(f"{directory} holds a {config['component_type']!r}, not a {expected_type.component_type!r}")
    model = cls(config_from_dict(cls.config_class, config["config"]))
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
