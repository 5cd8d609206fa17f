"""Test helper: train a tiny raster generator on real MNIST tokens; run directly or under torchrun.

python tests/train/worker.py RUN_DIR SHARDS --steps N [--resume] [--sleep S] [--rank-out DIR]
    [--parallel ddp|fsdp] [--grad-accum N] [--precision fp32|bf16|fp16] [--activation-checkpointing]
"""

import argparse
import os
import time

import torch
from safetensors.torch import save_file

from argen.data.shards import TokenShards
from argen.models.raster import RasterConfig, RasterTransformer
from argen.train.loop import TrainConfig, train
from argen.train.tasks import GeneratorTask


class SlowTask(GeneratorTask):
    """Sleeps a little per step so that a test can kill it mid-run."""

    def __init__(self, model, sleep: float):
        super().__init__(model)
        self.sleep = sleep

    def loss(self, module, batch):
        time.sleep(self.sleep)
        return super().loss(module, batch)


def build_model(vocab_size: int) -> RasterTransformer:
    torch.manual_seed(0)
    return RasterTransformer(
        RasterConfig(
            vocab_size=vocab_size, num_classes=10, grid_size=7, dim=32, num_layers=2, num_heads=2, multiple_of=16
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("shards")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--rank-out", default=None)
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    shards = TokenShards(args.shards)
    model = build_model(shards.vocab_size)
    config = TrainConfig(
        steps=args.steps,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        save_every=5,
        log_every=5,
        ema_decay=0.9,
        parallel=args.parallel,
        grad_accum=args.grad_accum,
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
    )
    train(SlowTask(model, args.sleep), shards, config, args.run_dir, resume=args.resume, progress=False)
    if args.rank_out:
        rank = int(os.environ.get("RANK", 0))
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, f"{args.rank_out}/rank{rank}.safetensors"
        )


if __name__ == "__main__":
    main()
