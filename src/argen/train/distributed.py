"""Process-group setup from the environment (torchrun, or Slurm's variables), nothing home-made; and the three
ways work is shared between ranks outside training: batches dealt out (`rank_batches`), their results gathered in
order on rank 0 (`gather_in_order`), and work done once by rank 0 for all (`run_on_main`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


def setup(device: str | None = None) -> DistInfo:
    """Join the process group when launched with several ranks; pick the device (GPU per local rank if any)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device is None:
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")  # a bare "cuda" means each rank's own GPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` holds on every rank (so all ranks take the same branch)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


T = TypeVar("T")


def rank_batches(items: range, batch_size: int, info: DistInfo) -> list[range]:
    """This rank's batches of `items`: the batches one process would cut (`batch_size` each, the last one shorter),
    batch b going to rank b % world_size. Each batch is then computed exactly as in one process."""
    batches = [range(i, min(i + batch_size, items.stop)) for i in range(items.start, items.stop, batch_size)]
    return batches[info.rank :: info.world_size]


def gather_in_order(results: list[T], info: DistInfo) -> list[T] | None:
    """On rank 0: every rank's results, one per batch of its `rank_batches`, back in batch order; None elsewhere.

    Results travel pickled (CPU tensors, arrays): this is for features and token ids, not for weights.
    """
    if info.world_size == 1:
        return list(results)
    parts = [None] * info.world_size if info.is_main else None
    dist.gather_object(results, parts, dst=0)
    if not info.is_main:
        return None
    total = sum(len(p) for p in parts)
    return [parts[b % info.world_size][b // info.world_size] for b in range(total)]


# True while rank 0 runs a function alone (inside run_on_main): a nested run_on_main must not wait for the other
# ranks, which are waiting for the outer one.
_alone: ContextVar[bool] = ContextVar("argen_rank0_alone", default=False)


def run_on_main(fn: Callable[[], T], share: bool = True) -> T | None:
    """fn() run by rank 0 alone, e.g. reading and checking a folder once instead of once per rank.

    Every rank receives its result (share=True) or None (share=False: rank 0 keeps it), and every rank raises the
    error fn raised on rank 0, so none waits forever for a failed one. Without a process group: fn().
    """
    if _alone.get() or not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    value = None
    if dist.get_rank() == 0:
        token = _alone.set(True)
        try:
            value = fn()
            box[0] = (value if share else None, None)
        except Exception as error:  # sent to the other ranks, then raised here too
            box[0] = (None, error)
        finally:
            _alone.reset(token)
    dist.broadcast_object_list(box, src=0)
    shared, error = box[0]
    if error is not None:
        raise error
    return value if dist.get_rank() == 0 else shared
