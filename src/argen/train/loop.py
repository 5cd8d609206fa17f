"""One training loop for tokenizers and generators, on one CPU or under torchrun (DDP or FSDP2).

What is trained against comes from a *task* (see `argen.train.tasks`); the loop owns the optimizer,
schedule, EMA, non-finite guards, progress, previews, checkpoints and exact resume.
Randomness is a pure function of (seed, step, rank): data order and the global RNG are re-derived at every
step, so a resumed run repeats exactly what the uninterrupted run would have done. Parallelism, precision,
activation checkpointing and compilation are applied from outside the model (`argen.train.parallel`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from argen.errors import CheckpointError, ConfigError, NonFiniteError, StorageError
from argen.pretrained import atomic_write, save_pretrained
from argen.storage import append_line
from argen.train import checkpoint
from argen.train.distributed import DistInfo, all_true, barrier, cleanup, setup
from argen.train.ema import EMA
from argen.train.optim import build_optimizer, warmup_cosine
from argen.train.parallel import ParallelConfig, autocast, gradient_scaler, model_blocks, no_sync, parallelize

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    # End after this many steps, the learning-rate schedule still spanning `steps` (0: run them all): a run cut to a
    # time budget ends as a killed one would, with its checkpoint and final/, and `--resume` continues it.
    stop_after: int = 0
    batch_size: int = 64  # global, across ranks
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # the newest checkpoints kept on disk (0: all, to pick one by FD afterwards)
    preview_every: int = 0  # steps between preview grids (0: only at the end)
    log_every: int = 10
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    num_workers: int = 0
    parallel: str = "ddp"  # with several ranks: "ddp" (replicas) or "fsdp" (FSDP2, sharded checkpoints)
    precision: str = "fp32"  # "bf16" (autocast / FSDP policy) or "fp16" (with a gradient scaler)
    grad_accum: int = 1  # micro-batches per optimizer step (each rank's share of batch_size split this often)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block

    def __post_init__(self) -> None:
        # (field, lowest, highest, whether the bounds are open); every number must also be finite.
        ranges = [
            ("steps", 1, None, False),
            ("stop_after", 0, None, False),
            ("batch_size", 1, None, False),
            ("lr", 0, None, True),
            ("weight_decay", 0, None, False),
            ("warmup_steps", 0, None, False),
            ("min_lr_ratio", 0, 1, False),
            ("grad_clip", 0, None, False),
            ("ema_decay", 0, 1, False),
            ("seed", 0, None, False),
            ("save_every", 0, None, False),
            ("keep_checkpoints", 0, None, False),
            ("preview_every", 0, None, False),
            ("log_every", 1, None, False),
            ("max_bad_steps", 1, None, False),
            ("num_workers", 0, None, False),
            ("grad_accum", 1, None, False),
        ]
        for name, low, high, open_low in ranges:
            _check_number(name, getattr(self, name), low, high, open_low)
        if self.stop_after > self.steps:
            raise ConfigError(f"training config: stop_after {self.stop_after} is past the run's {self.steps} steps")
        if self.ema_decay >= 1:
            raise ConfigError(f"training config: ema_decay must be < 1 (0 disables EMA), got {self.ema_decay}")
        if len(self.betas) != 2:
            raise ConfigError(f"training config: betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            _check_number("betas", beta, 0, 1, False)
            if beta >= 1:
                raise ConfigError(f"training config: each of betas must be < 1, got {self.betas!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"training config: batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        try:
            ParallelConfig(self.parallel, self.precision)
        except ConfigError as e:
            raise ConfigError(f"training config: {e}") from None

    @property
    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.parallel, self.precision, self.activation_checkpointing, self.compile)


_INT_FIELDS = {"steps", "stop_after", "batch_size", "warmup_steps", "seed", "save_every", "preview_every", "log_every"}
_INT_FIELDS |= {"max_bad_steps", "num_workers", "grad_accum"}


def _check_number(name: str, value: Any, low: float, high: float | None, open_low: bool) -> None:
    """ConfigError naming `name` unless `value` is a finite number (an int where counts are meant) in range."""
    kind = int if name in _INT_FIELDS else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"training config: {name} must be {what}, got {value!r}")
    bound = f"> {low}" if open_low else f">= {low}"
    if high is not None:
        bound += f" and <= {high}"
    if not math.isfinite(value) or value < low or (open_low and value == low) or (high is not None and value > high):
        raise ConfigError(f"training config: {name} must be a finite number {bound}, got {value}")


class Task(Protocol):
    model: nn.Module
    unit: str  # what throughput counts: "tokens" or "images"

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, int]: ...
    def train_module(self, model: nn.Module) -> nn.Module: ...  # what `loss` calls; DDP wraps it
    def after_step(self, step: int, batch: Any, info: DistInfo) -> None: ...
    def to(self, device: torch.device) -> None: ...  # the model and every component the task uses
    def preview(self) -> Any: ...  # a PIL image or None
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepBatches(Sampler[list[int]]):
    """Batches as a pure function of the step: epoch e is a permutation seeded by (seed, e);
    step s takes its slice of the global batch, rank r every world-th index of it."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int, world: int):
        if batch_size % world:
            raise ValueError(f"global batch_size {batch_size} is not divisible by {world} ranks")
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        self.n, self.bs, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        per_epoch = self.n // self.bs
        perm, perm_epoch = None, -1
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            yield perm[k * self.bs : (k + 1) * self.bs][self.rank :: self.world].tolist()


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    units_per_second: float
    skipped_steps: int
    output: Path | None


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


def train(
    task: Task,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train `task.model` on `dataset`; writes checkpoints, previews, `log.jsonl` and `final/` into run_dir.

    A run folder that already holds a run is continued with `resume`, replaced with `overwrite`, and otherwise
    refused (ConfigError): a second run must never prune the first one's checkpoints.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("resume and overwrite contradict each other: choose one")
    if not (resume or overwrite) and checkpoint.has_run(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a training run ({_describe_run(run_dir)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out folder"
        )
    info = setup(device)
    try:
        return _train(task, dataset, config, run_dir, resume, overwrite, info, progress)
    except StorageError as e:
        # What a person needs next: which checkpoint survived to resume from once there is space again.
        raise StorageError(f"{e}; {checkpoint.describe_last(run_dir)}") from e
    finally:
        cleanup(info)


def _describe_run(run_dir: Path) -> str:
    folders = checkpoint.step_folders(run_dir)
    return f"checkpoints up to {folders[-1].name}" if folders else "final weights"


def _prepare_run_dir(run_dir: Path, config: TrainConfig, overwrite: bool) -> None:
    """On the main rank: replace a previous run if asked, drop leftovers of interrupted writes, save the config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and checkpoint.has_run(run_dir):
        log.warning("--overwrite: deleting the previous run in %s (%s)", run_dir, _describe_run(run_dir))
        for name in ("checkpoints", "final", "previews"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    cleaned = checkpoint.clean_run_dir(run_dir)
    if cleaned:
        log.info("removed %d leftovers of an interrupted write in %s", cleaned, run_dir)
    atomic_write(run_dir / "train_config.json", lambda t: Path(t).write_text(json.dumps(asdict(config), indent=2)))


def _resume(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler | None,
    task: Task,
    comparable: dict[str, Any],
    info: DistInfo,
) -> tuple[int, int]:
    """Load the newest complete checkpoint strictly into model, optimizer, EMA, scaler and task; returns
    (step, skipped). Every rank loads (a sharded checkpoint gives each rank its own shards)."""
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", run_dir)
        return 0, 0
    source = str(ckpt / checkpoint.STATE_NAME)
    state = checkpoint.load_trainer_state(ckpt / checkpoint.STATE_NAME)
    differs = _config_difference(state["config"], comparable)
    if differs:
        raise CheckpointError(
            f"cannot resume {ckpt}: its training config differs in {differs}; "
            "train with the checkpoint's settings (the same number of ranks too), or into another --out folder"
        )
    if checkpoint.is_sharded(ckpt):
        ema_state = checkpoint.load_sharded(ckpt, model, optimizer, ema.shadow if ema else None)
    else:
        ema_state = checkpoint.load_weights(ckpt, model)
        checkpoint.load_optimizer_state(optimizer, state.get("optimizer"), model, source)
    if (ema is None) != (ema_state is None):
        what = "EMA state" if checkpoint.is_sharded(ckpt) else "ema/ folder"
        raise CheckpointError(
            f"{ckpt}: {'no' if ema_state is None else 'an'} {what}, but EMA is {'on' if ema else 'off'}"
        )
    if ema is not None:
        ema.load_state_dict(ema_state, state["ema_updates"], str(ckpt / "ema"))
    if (scaler is None) != ("scaler" not in state):
        raise CheckpointError(f"{source}: a gradient scaler state {'is missing' if scaler else 'is unexpected'}")
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    try:
        task.load_state_dict(state["task"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: the task state does not match this task ({type(e).__name__}: {e})") from e
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in ("step", "skipped")):
        raise CheckpointError(
            f"{source}: step and skipped must be integers >= 0, got {state['step']!r}, {state['skipped']!r}"
        )
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"], state["skipped"]


def _config_difference(saved: Any, now: dict[str, Any]) -> str:
    """'lr (checkpoint 0.0003, now 1.0), ...' for the fields that differ; empty if none."""
    if not isinstance(saved, dict):
        return f"every field (the checkpoint holds {type(saved).__name__})"
    # Fields added since the checkpoint was written count as their defaults (the rank count as unknown).
    saved = {**_comparable(TrainConfig()), "world_size": now.get("world_size"), **saved}
    keys = sorted(set(saved) | set(now))
    return ", ".join(
        f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in keys if saved.get(k) != now.get(k)
    )


def _truncate_log(path: Path, step: int) -> None:
    """Keep only records up to `step` (the resumed one): the steps after it are trained again and re-logged.
    A torn last line (a killed writer) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _train(
    task: Task,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    info: DistInfo,
    progress: bool,
) -> TrainResult:
    task.to(info.device)  # the model and whatever else the task runs (a preview's tokenizer)
    model = task.model
    parallel = config.parallel_config
    blocks = model_blocks(model)
    if config.parallel == "fsdp" and not blocks:
        raise ConfigError(f"--parallel fsdp shards transformer blocks; a {type(model).__name__} has none: use ddp")
    sharded = config.parallel == "fsdp" and info.world_size > 1
    if info.is_main:
        _prepare_run_dir(run_dir, config, overwrite)
    barrier(info)
    module = parallelize(task.train_module(model), blocks, parallel, info)  # the loss the task calls
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)  # after sharding
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    scaler = gradient_scaler(parallel, info.device)
    bad_in_row = 0
    comparable = {**_comparable(config), "world_size": info.world_size}
    start, skipped = _resume(run_dir, model, optimizer, ema, scaler, task, comparable, info) if resume else (0, 0)
    if info.is_main:
        _truncate_log(run_dir / "log.jsonl", start)
    if config.batch_size % (info.world_size * config.grad_accum):
        raise ConfigError(
            f"batch_size {config.batch_size} does not split into {info.world_size} ranks x {config.grad_accum} "
            "micro-batches: choose a multiple of their product"
        )

    end = config.stop_after or config.steps
    if start > end:
        raise ConfigError(f"--stop-after {end}: the run's newest checkpoint is already at step {start}")
    sampler = StepBatches(len(dataset), config.batch_size, config.seed, start, end, info.rank, info.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers)
    bar = tqdm(
        total=config.steps, initial=start, disable=not (progress and info.is_main), unit="step", dynamic_ncols=True
    )
    t0, units, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    for step, batch in zip(range(start, end), loader, strict=True):
        torch.manual_seed(_step_seed(config.seed, step, info.rank))
        lr = config.lr * warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [b.to(info.device) for b in batch]
        micro = list(zip(*(b.chunk(config.grad_accum) for b in batch), strict=True))
        losses, n = [], 0
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with no_sync(module, sync=last), autocast(parallel, info.device, sharded):
                loss, count = task.loss(module, list(part))
            if not all_true(bool(torch.isfinite(loss)), info):  # every rank takes the same branch
                break
            (scaler.scale(loss / len(micro)) if scaler else loss / len(micro)).backward()
            losses.append(loss.detach())
            n += count
        loss_ok = len(losses) == len(micro)
        ok = loss_ok
        if ok:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            ok = bool(torch.isfinite(_full(grad_norm)))  # gradients are already averaged: every rank agrees
        if not ok and scaler is not None and loss_ok:
            # fp16 overflow: the scaler lowers its scale and the step is skipped; not a divergence.
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            skipped += 1
            log.info("step %d: fp16 gradients overflowed, step skipped (loss scale now %g)", step, scaler.get_scale())
        elif not ok:
            optimizer.zero_grad(set_to_none=True)
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, bad_in_row)
            if bad_in_row >= config.max_bad_steps:
                raise NonFiniteError(
                    f"{bad_in_row} non-finite steps in a row at step {step}: aborting; lower the "
                    f"learning rate or check the data ({checkpoint.describe_last(run_dir)})"
                )
        else:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad_in_row = 0
            if ema is not None:
                ema.update(model)
            task.after_step(step, batch, info)
            last_loss = float(torch.stack(losses).mean())
        units += n * info.world_size
        rate = units / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", **{f"{task.unit}/s": f"{rate:,.0f}"})
        done = step + 1
        if info.is_main and (done % config.log_every == 0 or done == end):
            record = {"step": done, "loss": last_loss, "lr": lr, f"{task.unit}_per_s": rate, "skipped": skipped}
            append_line(run_dir / "log.jsonl", json.dumps(record))
        if (config.save_every and done % config.save_every == 0) or done == end:
            state = {
                "step": done,
                "skipped": skipped,
                "ema_updates": ema.updates if ema else 0,
                "task": task.state_dict(),
                "config": comparable,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if config.parallel == "fsdp":
                checkpoint.save_sharded(
                    run_dir, done, model, optimizer, ema.shadow if ema else None, state, info, config.keep_checkpoints
                )
            elif info.is_main:
                state["optimizer"] = optimizer.state_dict()
                checkpoint.save_checkpoint(
                    run_dir, done, model, ema.state_dict() if ema else None, state, config.keep_checkpoints
                )
            barrier(info)
        if (config.preview_every and done % config.preview_every == 0) or done == end:
            if sharded:
                if done == end and info.is_main:
                    log.info("no previews under FSDP (the weights are sharded): sample from final/ instead")
            elif info.is_main:
                _preview(task, model, ema, run_dir / "previews" / f"step-{done:08d}.png")
    bar.close()
    seconds = time.perf_counter() - t0
    output = _save_final(run_dir, model, ema, info, sharded)
    barrier(info)
    return TrainResult(end, last_loss, seconds, units / max(seconds, 1e-9), skipped, output)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; a plain tensor as it is. Collective: every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _save_final(run_dir: Path, model: nn.Module, ema: EMA | None, info: DistInfo, sharded: bool) -> Path | None:
    """`final/`: the EMA weights if any, else the raw ones, as a pretrained folder (gathered whole under FSDP)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)  # whole on the main rank, empty on the others
        if ema is not None:
            own = {k: v.dtype for k, v in model.state_dict().items()}
            weights = {k: _full(v).to(own[k]).cpu() for k, v in ema.shadow.items()}
    else:
        weights = ema.weights_for(model) if ema else None
    if not info.is_main:
        return None
    output = run_dir / "final"
    save_pretrained(model, output, state_dict=weights)
    return output


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """Fields that must match to resume (everything but bookkeeping), as plain JSON-like values."""
    d = asdict(config)
    bookkeeping = (
        "stop_after",
        "save_every",
        "keep_checkpoints",
        "preview_every",
        "log_every",
        "num_workers",
        "max_bad_steps",
    )
    for k in (*bookkeeping, "activation_checkpointing", "compile"):  # neither changes the numbers
        d.pop(k)
    d["betas"] = list(d["betas"])
    return d


@torch.no_grad()
def _preview(task: Task, model: nn.Module, ema: EMA | None, path: Path) -> None:
    """Previews use the EMA weights when there are any (swapped in, then restored)."""
    raw = None
    if ema is not None:
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.weights_for(model))
    model.eval()
    try:
        image = task.preview()
    finally:
        if raw is not None:
            model.load_state_dict(raw)
        model.train()
    if image is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
