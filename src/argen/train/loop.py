"""One training loop for tokenizers and generators, on one CPU or under torchrun (DDP).

What is trained against comes from a *task* (see `argen.train.tasks`); the loop owns the optimizer,
schedule, EMA, non-finite guards, progress, previews, checkpoints and exact resume.
Randomness is a pure function of (seed, step, rank): data order and the global RNG are re-derived at every
step, so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from argen.pretrained import atomic_write, save_pretrained
from argen.train import checkpoint
from argen.train.distributed import DistInfo, all_true, barrier, cleanup, setup
from argen.train.ema import EMA
from argen.train.optim import build_optimizer, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
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
    preview_every: int = 0  # steps between preview grids (0: only at the end)
    log_every: int = 10
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")


class Task(Protocol):
    model: nn.Module
    unit: str  # what throughput counts: "tokens" or "images"

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, int]: ...
    def after_step(self, step: int, batch: Any, info: DistInfo) -> None: ...
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
) -> TrainResult:
    """Train `task.model` on `dataset`; writes checkpoints, previews, `log.jsonl` and `final/` into run_dir."""
    run_dir = Path(run_dir)
    info = setup(device)
    try:
        return _train(task, dataset, config, run_dir, resume, info, progress)
    finally:
        cleanup(info)


def _train(
    task: Task, dataset: Dataset, config: TrainConfig, run_dir: Path, resume: bool, info: DistInfo, progress: bool
) -> TrainResult:
    model = task.model.to(info.device)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cleaned = checkpoint.clean_run_dir(run_dir)
        if cleaned:
            log.info("removed %d leftovers of an interrupted write in %s", cleaned, run_dir)
        atomic_write(run_dir / "train_config.json", lambda t: Path(t).write_text(json.dumps(asdict(config), indent=2)))
    barrier(info)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    start, bad_in_row, skipped = 0, 0, 0
    if resume:
        ckpt = checkpoint.latest_checkpoint(run_dir)
        if ckpt is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
        else:
            state, ema_state = checkpoint.load_checkpoint(ckpt, model)
            if state["config"] != _comparable(config):
                raise ValueError(
                    f"cannot resume {ckpt}: its training config differs: {state['config']} vs {asdict(config)}"
                )
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None and ema_state is not None:
                ema.load_state_dict(ema_state, state["ema_updates"])
            task.load_state_dict(state["task"])
            start, skipped = state["step"], state["skipped"]
            log.info("resumed from %s at step %d", ckpt, start)
    module = DistributedDataParallel(model) if info.world_size > 1 else model

    sampler = StepBatches(
        len(dataset), config.batch_size, config.seed, start, config.steps, info.rank, info.world_size
    )
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers)
    bar = tqdm(
        total=config.steps, initial=start, disable=not (progress and info.is_main), unit="step", dynamic_ncols=True
    )
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=info.device.type == "cuda")
    t0, units, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    for step, batch in zip(range(start, config.steps), loader, strict=True):
        torch.manual_seed(_step_seed(config.seed, step, info.rank))
        lr = config.lr * warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [b.to(info.device) for b in batch]
        with autocast:
            loss, n = task.loss(module, batch)
        ok = all_true(bool(torch.isfinite(loss)), info)
        if ok:
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            ok = bool(torch.isfinite(grad_norm))  # gradients are already averaged: every rank agrees
        if not ok:
            optimizer.zero_grad(set_to_none=True)
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, bad_in_row)
            if bad_in_row >= config.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_row} non-finite steps in a row at step {step}: aborting; lower the "
                    f"learning rate or check the data (last good checkpoint is in {run_dir})"
                )
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad_in_row = 0
            if ema is not None:
                ema.update(model)
            task.after_step(step, batch, info)
            last_loss = loss.item()
        units += n * info.world_size
        rate = units / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", **{f"{task.unit}/s": f"{rate:,.0f}"})
        done = step + 1
        if info.is_main and (done % config.log_every == 0 or done == config.steps):
            record = {"step": done, "loss": last_loss, "lr": lr, f"{task.unit}_per_s": rate, "skipped": skipped}
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            if info.is_main:
                state = {
                    "step": done,
                    "skipped": skipped,
                    "optimizer": optimizer.state_dict(),
                    "ema_updates": ema.updates if ema else 0,
                    "task": task.state_dict(),
                    "config": _comparable(config),
                }
                checkpoint.save_checkpoint(run_dir, done, model, ema.state_dict() if ema else None, state)
            barrier(info)
        if info.is_main and ((config.preview_every and done % config.preview_every == 0) or done == config.steps):
            _preview(task, model, ema, run_dir / "previews" / f"step-{done:08d}.png")
    bar.close()
    seconds = time.perf_counter() - t0
    output = None
    if info.is_main:
        output = run_dir / "final"
        save_pretrained(model, output, state_dict=ema.weights_for(model) if ema else None)
    barrier(info)
    return TrainResult(config.steps, last_loss, seconds, units / max(seconds, 1e-9), skipped, output)


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """Fields that must match to resume (everything but bookkeeping), as plain JSON-like values."""
    d = asdict(config)
    for k in ("save_every", "preview_every", "log_every", "num_workers", "max_bad_steps"):
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
