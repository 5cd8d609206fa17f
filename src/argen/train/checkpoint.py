"""Training checkpoints for exact resume, written so that a kill, a full disk or a second run loses nothing.

Layout inside a run folder:
    checkpoints/step-00000500/model/   pretrained folder of the raw weights
    checkpoints/step-00000500/ema/     pretrained folder of the EMA weights (if EMA is on)
    checkpoints/step-00000500/trainer_state.pt   optimizer, step, EMA count, task state (tensors + plain types)
    checkpoints/latest                 name of the newest complete checkpoint, replaced atomically last
Under FSDP (`--parallel fsdp`) the weights, EMA and optimizer state are sharded instead:
    checkpoints/step-00000500/sharded/   torch.distributed.checkpoint folder (.metadata + one file per rank)
    checkpoints/step-00000500/trainer_state.pt   step, EMA count, task state, scaler; written after every shard
Every file is written to a temp file, fsynced and renamed. `trainer_state.pt` is written last inside a folder,
so a folder without it is an interrupted write; one with all files readable is *complete*. Resume takes the
newest complete checkpoint (`latest` is a pointer for people and tools, not trusted alone), and nothing is
deleted unless a newer complete checkpoint supersedes it.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from argen.errors import CheckpointError, NonFiniteError
from argen.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    check_finite_loaded,
    describe_non_finite,
    load_safetensors,
    load_state_dict_strict,
    non_finite,
    remove_stray_temp_files,
    save_pretrained,
)

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
STATE_KEYS = {"step", "skipped", "ema_updates", "task", "config"}
OPTIONAL_STATE_KEYS = {"optimizer", "scaler"}  # optimizer: in full checkpoints; scaler: fp16 runs
SHARDED = "sharded"


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(folder: Path) -> int | None:
    """The step a `step-00000500` folder holds, or None for anything else."""
    name = folder.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() and folder.is_dir() else None


def step_folders(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by step number, not by name)."""
    root = _dir(run_dir)
    found = [d for d in root.iterdir() if _step_of(d) is not None] if root.is_dir() else []
    return sorted(found, key=_step_of)


def _readable_weights(folder: Path) -> bool:
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt"):
            pass  # only the header is read: cheap even for large checkpoints
    except (SafetensorError, OSError):
        return False
    return (folder / CONFIG_NAME).is_file()


def is_complete(ckpt: Path) -> bool:
    """All files present and readable: the weights' headers parse and the trainer state is a whole archive."""
    state = ckpt / STATE_NAME
    if is_sharded(ckpt):
        return state.is_file() and zipfile.is_zipfile(state) and (ckpt / SHARDED / ".metadata").is_file()
    if not (state.is_file() and zipfile.is_zipfile(state) and _readable_weights(ckpt / "model")):
        return False
    return not (ckpt / "ema").exists() or _readable_weights(ckpt / "ema")


def newest_complete(run_dir: Path) -> Path | None:
    return next((d for d in reversed(step_folders(run_dir)) if is_complete(d)), None)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, whatever `latest` says (it may be empty, dangling or stale)."""
    found = newest_complete(run_dir)
    pointer = _dir(run_dir) / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if found is not None and named != found.name:
        log.warning("%s names %r; the newest complete checkpoint is %s", pointer, named, found.name)
    return found


def has_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds the checkpoints or final weights of a run."""
    return bool(step_folders(run_dir)) or (Path(run_dir) / "final" / WEIGHTS_NAME).is_file()


def clean_run_dir(run_dir: Path) -> int:
    """Remove stray temp files, and checkpoint folders a killed writer left unfinished (no trainer state)
    that are newer than the newest complete checkpoint. Returns how many things were removed."""
    root = _dir(run_dir)
    n = remove_stray_temp_files(Path(run_dir)) + remove_stray_temp_files(root)
    newest = newest_complete(run_dir)
    newest_step = _step_of(newest) if newest is not None else -1
    for d in step_folders(run_dir):
        for sub in [d, d / "model", d / "ema"]:
            n += remove_stray_temp_files(sub)
        if _step_of(d) > newest_step and not (d / STATE_NAME).exists():
            shutil.rmtree(d)
            n += 1
        elif not is_complete(d):
            # Its trainer state exists but does not read: damage, not an interrupted write. Keep it for a person.
            log.warning("%s is incomplete or corrupt; it is kept but not resumed from", d)
    return n


def describe_last(run_dir: Path) -> str:
    """'the last complete checkpoint is X' (or that there is none), for error messages."""
    last = newest_complete(run_dir)
    return f"the last complete checkpoint is {last}" if last else "no checkpoint of this run is complete yet"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema_state: dict | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write step `step`'s checkpoint, point `latest` at it, then prune what it supersedes (all but `keep`; 0 keeps
    every one).

    Non-finite weights or optimizer moments are refused before anything is written (NonFiniteError). If a
    write fails (StorageError), the half-written folder is removed.
    """
    _check_finite_to_save(run_dir, step, model, ema_state, trainer_state)
    root = _dir(run_dir)
    ckpt = root / f"step-{step:08d}"
    existed = ckpt.exists()
    try:
        save_pretrained(model, ckpt / "model")
        if ema_state is not None:
            save_pretrained(model, ckpt / "ema", state_dict=ema_state)
        atomic_write(ckpt / STATE_NAME, lambda tmp: torch.save(trainer_state, tmp))
    except BaseException:
        if not existed:
            shutil.rmtree(ckpt, ignore_errors=True)  # half a checkpoint is no checkpoint: leave none behind
        raise
    atomic_write(root / "latest", lambda tmp: Path(tmp).write_text(ckpt.name))
    _prune(run_dir, step, keep)
    return ckpt


def _check_finite_to_save(
    run_dir: Path, step: int, model: torch.nn.Module, ema_state: dict | None, trainer_state: dict[str, Any]
) -> None:
    parameters = [n for n, _ in model.named_parameters()]
    problems = []
    for what, tensors in [("weights", model.state_dict()), ("EMA weights", ema_state or {})]:
        bad = non_finite(tensors, parameters)
        if bad:
            problems.append(f"{what} {describe_non_finite(tensors, bad)}")
    moments = {
        f"optimizer state {key} of parameter #{i}": v
        for i, per_param in trainer_state.get("optimizer", {}).get("state", {}).items()
        for key, v in per_param.items()
        if isinstance(v, torch.Tensor)
    }
    bad = non_finite(moments, moments)
    if bad:
        problems.append(describe_non_finite(moments, bad))
    if problems:
        raise NonFiniteError(
            f"step {step}: the run diverged, not saving non-finite {'; '.join(problems)}; "
            f"{describe_last(run_dir)}; lower the learning rate and resume from it"
        )


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Remove checkpoints older than `step` beyond the newest `keep - 1` of them; never a newer one. keep 0 removes
    none."""
    if keep == 0:
        return
    older = [d for d in step_folders(run_dir) if _step_of(d) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir()


def load_trainer_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another one")
    try:
        # Plain tensors, numbers and dicts only: never unpickle arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises retrying with weights_only=False, i.e. running the file's code: never repeat it.
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values (possibly code); refusing to load it. "
            "Delete this checkpoint folder, or resume from one this run wrote"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated; delete this checkpoint folder") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a training state (a {type(state).__name__}, not a dict)")
    missing, unexpected = sorted(STATE_KEYS - set(state)), sorted(set(state) - STATE_KEYS - OPTIONAL_STATE_KEYS)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match this trainer: missing keys {missing}, unexpected {unexpected}")
    return state


def load_checkpoint(ckpt: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict | None]:
    """Load raw weights into `model` strictly; return (trainer_state, ema_state or None).

    Every part is checked before it is used: keys and shapes of the weights, finite values, and a trainer
    state made of plain values only. The EMA state is returned unchecked against the model: `EMA` checks it.
    """
    ckpt = Path(ckpt)
    state = load_trainer_state(ckpt / STATE_NAME)
    return state, load_weights(ckpt, model)


def load_weights(ckpt: Path, model: torch.nn.Module) -> dict | None:
    """Load a full checkpoint's raw weights into `model` strictly; return its EMA state or None."""
    load_state_dict_strict(model, load_safetensors(ckpt / "model" / WEIGHTS_NAME), str(ckpt / "model"))
    ema = None
    if (ckpt / "ema").is_dir():
        ema = load_safetensors(ckpt / "ema" / WEIGHTS_NAME)
        check_finite_loaded(model, ema, str(ckpt / "ema"))
    return ema


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, model: torch.nn.Module, source: str) -> None:
    """Load an optimizer state strictly: the same parameter groups, per-parameter state shaped like its
    parameter, finite moments. torch itself checks only the group sizes and fails later on a shrunk moment."""
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise CheckpointError(f"{source}: 'optimizer' is not an optimizer state (expected keys state, param_groups)")
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in saved["param_groups"]]
    if ours != theirs:
        raise CheckpointError(f"{source}: optimizer parameter groups of sizes {theirs}; this model needs {ours}")
    index = [i for g in saved["param_groups"] for i in g["params"]]
    problems = [f"unexpected parameter index {i}" for i in sorted(set(saved["state"]) - set(index), key=str)]
    for i, p in zip(index, params, strict=True):
        for key, v in saved["state"].get(i, {}).items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue  # the step count
            if tuple(v.shape) != tuple(p.shape):
                problems.append(f"{names[id(p)]}.{key}: shape {tuple(v.shape)} vs parameter {tuple(p.shape)}")
            elif not bool(torch.isfinite(v).all()):
                problems.append(f"{names[id(p)]}.{key}: NaN or inf values")
    if problems:
        raise CheckpointError(f"{source}: the optimizer state does not match the model: {'; '.join(problems[:5])}")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: the optimizer state does not load: {e}") from e


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema
    return state


def _parameter_keys(model: torch.nn.Module) -> set[str]:
    """Keys of the parameters in a sharded state (buffers such as a -inf attention mask are allowed)."""
    return {f"{part} {n}" for part in ("model", "ema") for n, _ in model.named_parameters()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def save_sharded(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict | None,
    trainer_state: dict[str, Any],
    info: Any,
    keep: int = 2,
) -> Path | None:
    """Every rank writes its shards of weights, EMA and optimizer state through torch.distributed.checkpoint;
    then the main rank writes `trainer_state.pt` (the mark of a complete checkpoint), `latest`, and prunes.
    Non-finite values on any rank are refused on every rank before anything is written."""
    import torch.distributed.checkpoint as dcp

    from argen.train.distributed import all_true, barrier

    state = _sharded_state(model, optimizer, ema)
    tensors = {
        f"{part} {k}": _local(v)
        for part in ("model", "ema")
        for k, v in state.get(part, {}).items()
        if isinstance(v, torch.Tensor)
    }
    bad = non_finite(tensors, _parameter_keys(model))
    if not all_true(not bad, info):
        raise NonFiniteError(
            f"step {step}: the run diverged, not saving non-finite "
            f"{describe_non_finite(tensors, bad) if bad else 'values (on another rank)'}; "
            f"{describe_last(run_dir)}; lower the learning rate and resume from it"
        )
    ckpt = _dir(run_dir) / f"step-{step:08d}"
    existed = ckpt.exists()
    try:
        dcp.save(state, checkpoint_id=str(ckpt / SHARDED))
        barrier(info)
        if info.is_main:
            atomic_write(ckpt / STATE_NAME, lambda tmp: torch.save(trainer_state, tmp))
    except BaseException:
        if info.is_main and not existed:
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    if info.is_main:
        atomic_write(_dir(run_dir) / "latest", lambda tmp: Path(tmp).write_text(ckpt.name))
        _prune(run_dir, step, keep)
    return ckpt


def load_sharded(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None
) -> dict | None:
    """Load a sharded checkpoint in place (each rank reads the pieces of its own shards) and strictly: keys
    the checkpoint lacks or holds beyond this model's are listed. Returns the loaded EMA state or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = str(Path(ckpt) / SHARDED)
    state = _sharded_state(model, optimizer, ema)
    try:
        saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"{folder} is corrupt or unreadable ({e}); resume from another checkpoint") from e
    ours = {f"{part}.{k}" for part in ("model", "ema") for k in state.get(part, {})}
    found = {k for k in saved if k.startswith(("model.", "ema."))}
    missing, unexpected = sorted(ours - found), sorted(found - ours)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match this model: missing keys {missing[:8]}, unexpected {unexpected[:8]}"
        )
    try:
        dcp.load(state, checkpoint_id=folder)
    except (RuntimeError, ValueError, KeyError) as e:  # a wrong shape, a missing optimizer entry
        raise CheckpointError(f"{folder} does not load into this model and optimizer: {str(e).splitlines()[0]}") from e
    tensors = {f"{p} {k}": _local(v) for p in ("model", "ema") for k, v in state.get(p, {}).items()}
    bad = non_finite(tensors, _parameter_keys(model))
    if bad:
        raise CheckpointError(
            f"{folder} holds non-finite {describe_non_finite(tensors, bad)}; resume from another one"
        )
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return state.get("ema")
