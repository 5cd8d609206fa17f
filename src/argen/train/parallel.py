"""Parallelism applied to a model from outside, as torchtitan's `parallelize` does: the model files never know.

    module = parallelize(OrderLoss(model), blocks, ParallelConfig("fsdp", "bf16", checkpointing=True), info)

- "ddp": the module is wrapped in DistributedDataParallel (one full replica per rank); mixed precision is the
  loop's autocast.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) per transformer block, then the root: parameters,
  gradients and optimizer state are sharded across ranks and gathered one block at a time. Mixed precision is
  a `MixedPrecisionPolicy` (bf16/fp16 compute, float32 gradient reduction and master weights).
Which modules are blocks is the model's own statement (`repeated_blocks()`), not a guess from names. Activation
checkpointing (recompute a block's activations in backward) and `torch.compile` are applied per block, with
the composable APIs, so parameter names and checkpoint keys stay those of the plain model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from argen.errors import ConfigError
from argen.train.distributed import DistInfo

log = logging.getLogger(__name__)

PARALLEL_MODES = ("ddp", "fsdp")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ParallelConfig:
    mode: str = "ddp"
    precision: str = "fp32"
    checkpointing: bool = False  # activation checkpointing per block
    compile: bool = False  # torch.compile per block

    def __post_init__(self) -> None:
        if self.mode not in PARALLEL_MODES:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks as it declares them; a model without any (a tokenizer, the classifier) is
    one unit."""
    declared = getattr(type(model), "repeated_blocks", None)
    return list(declared(model)) if declared is not None else []


def parallelize(module: nn.Module, blocks: list[nn.Module], config: ParallelConfig, info: DistInfo) -> nn.Module:
    """Apply activation checkpointing, compilation and data parallelism to `module` (whose forward is the loss)
    for `info.world_size` ranks; returns what the loop calls. One rank: no wrapper (FSDP of one rank is a
    plain model), but checkpointing and compilation still apply."""
    if config.checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)
    if config.compile:
        for block in blocks:
            block.compile()
    if info.world_size == 1:
        return module
    if config.mode == "ddp":
        return DistributedDataParallel(module)
    return _fully_shard(module, blocks, config)


def _fully_shard(module: nn.Module, blocks: list[nn.Module], config: ParallelConfig) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = PRECISIONS[config.precision]
    policy = MixedPrecisionPolicy(
        param_dtype=None if compute == torch.float32 else compute, reduce_dtype=torch.float32
    )
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once in backward: keep them gathered (torchtitan).
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(module, mp_policy=policy)  # the root: embeddings, head and anything outside the blocks
    log.info("FSDP2: %d blocks and the root sharded, %s compute", len(blocks), config.precision)
    return module


def autocast(config: ParallelConfig, device: torch.device, sharded: bool):
    """The loop's mixed precision for DDP or one process; under FSDP (`sharded`) the policy casts instead."""
    compute = PRECISIONS[config.precision]
    return torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32 and not sharded)


def gradient_scaler(config: ParallelConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if config.precision == "fp16" else None


def no_sync(module: nn.Module, sync: bool):
    """Skip the gradient all-reduce of a micro-batch that is not the last one of an accumulated step."""
    import contextlib

    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
