"""Training checkpoints for exact resume, written so that a kill at any instant loses nothing.

Layout inside a run folder:
    checkpoints/step-00000500/model/   pretrained folder of the raw weights
    checkpoints/step-00000500/ema/     pretrained folder of the EMA weights (if EMA is on)
    checkpoints/step-00000500/trainer_state.pt   optimizer, step, EMA count, task state (tensors + plain types)
    checkpoints/latest                 name of the newest complete checkpoint, replaced atomically last
Every file is written to a temp file, fsynced and renamed; `latest` moves only after all files exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from argen.pretrained import (
    WEIGHTS_NAME,
    atomic_write,
    load_safetensors,
    load_state_dict_strict,
    remove_stray_temp_files,
    save_pretrained,
)

STATE_NAME = "trainer_state.pt"


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema_state: dict | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    root = _dir(run_dir)
    ckpt = root / f"step-{step:08d}"
    save_pretrained(model, ckpt / "model")
    if ema_state is not None:
        save_pretrained(model, ckpt / "ema", state_dict=ema_state)
    atomic_write(ckpt / STATE_NAME, lambda tmp: torch.save(trainer_state, tmp))
    atomic_write(root / "latest", lambda tmp: Path(tmp).write_text(ckpt.name))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = _dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    ckpt = _dir(run_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / STATE_NAME).is_file() else None


def clean_run_dir(run_dir: Path) -> int:
    """Remove stray temp files and checkpoint folders a killed writer left unfinished."""
    root = _dir(run_dir)
    n = remove_stray_temp_files(Path(run_dir)) + remove_stray_temp_files(root)
    current = latest_checkpoint(run_dir)
    for d in root.glob("step-*") if root.is_dir() else []:
        for sub in [d, d / "model", d / "ema"]:
            n += remove_stray_temp_files(sub)
        if current is None or d.name > current.name:
            shutil.rmtree(d, ignore_errors=True)  # newer than the pointer: never completed
            n += 1
    return n


def load_checkpoint(ckpt: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict | None]:
    """Load raw weights into `model`; return (trainer_state, ema_state or None)."""
    load_state_dict_strict(model, load_safetensors(ckpt / "model" / WEIGHTS_NAME), str(ckpt / "model"))
    ema = load_safetensors(ckpt / "ema" / WEIGHTS_NAME) if (ckpt / "ema").is_dir() else None
    # Plain tensors, numbers and dicts only: never unpickle arbitrary objects.
    state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
    return state, ema
