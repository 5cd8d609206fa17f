"""argen's samplers at the official models' real sizes, float32 against bfloat16 weights, in one run.

    python bench/inference_speed.py [--models var-d16 gpt-b] [--batch-sizes 1 8] [--repeats 3] [--threads 1]
                                    [--dtypes fp32 bf16 bf16-plain] [--flops]

Random weights at the released sizes (VAR-d16 with VAR's VQVAE at 256 px; LlamaGen GPT-B with VQ-16 at 256 px;
10 classes, every width and depth as released), sampled with the official defaults (VAR: cfg 4 ramped, top-k 900,
top-p 0.95; LlamaGen: cfg 4, top-k 2000). Timed: a whole batch, tokens and decode to pixels, after one warm-up;
the dtypes are interleaved within every repeat (A, B, A, B, ...) so that a shared machine slows them alike, and
the median is printed with min and max. `--flops` adds achieved FLOP/s as a share of the measured matmul peak in
each dtype (one extra counted run per model at batch 1; FLOPs grow linearly with the batch). `bf16-plain` is
bfloat16 with plain `nn.Linear` layers instead of the prepacked ones a CPU bfloat16 pipeline gets.

The comparison with the official code on identical weights (README, "Official checkpoints") was measured with a
harness kept outside this repository; this script times argen alone.
"""

import argparse
import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from argen.eval.speed import matmul_peak_flops
from argen.models.layers import rows_as_given
from argen.models.next_scale import NEXT_SCALE_PRESETS, NextScaleTransformer
from argen.models.packed_linear import unpack_linears
from argen.models.raster import RASTER_PRESETS, RasterTransformer
from argen.pipeline import ARPipeline
from argen.sampling.config import SamplerConfig
from argen.tokenizers.multiscale import MULTISCALE_PRESETS, MultiScaleVQ
from argen.tokenizers.vq import VQ_PRESETS, VQTokenizer

# "bf16-plain": bfloat16 without the prepacked linear weights (`models/packed_linear.py`), to show what they gain
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-plain": torch.bfloat16}
CLASSES = 10


def var_d16() -> ARPipeline:
    config = dataclasses.replace(NEXT_SCALE_PRESETS["var-d16"], num_classes=CLASSES)
    sampler = SamplerConfig.from_flat({"cfg_scale": 5.0, "cfg_schedule": "var_ramp", "top_k": 900, "top_p": 0.95})
    return ARPipeline(MultiScaleVQ(MULTISCALE_PRESETS["var-vae-256"]), NextScaleTransformer(config), sampler=sampler)


def gpt_b() -> ARPipeline:
    config = dataclasses.replace(RASTER_PRESETS["GPT-B"], num_classes=CLASSES)
    sampler = SamplerConfig.from_flat({"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0})
    return ARPipeline(VQTokenizer(VQ_PRESETS["llamagen-vq16"]), RasterTransformer(config), sampler=sampler)


MODELS = {"var-d16": var_d16, "gpt-b": gpt_b}


def run(pipe: ARPipeline, batch: int) -> None:
    pipe(torch.arange(batch) % CLASSES, seed=0, batch_size=batch, output_type="pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flops", action="store_true", help="report FLOP/s against the matmul peak of each dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {d: matmul_peak_flops(dtype=DTYPES[d]) for d in args.dtypes} if args.flops else {}
    print(f"{args.threads} thread(s)", *(f"{d} matmul peak {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()), sep="; ")
    header = f"{'model':8} {'batch':>5} {'dtype':10} {'s/batch':>8} {'min':>7} {'max':>7} {'s/image':>8} {'speed':>7}"
    print(header + (f" {'% peak':>6}" if args.flops else ""))
    for name in args.models:
        torch.manual_seed(0)
        reference = MODELS[name]()
        pipes = {d: MODELS[name]().to(dtype=DTYPES[d]) for d in args.dtypes}
        if "bf16-plain" in pipes:
            unpack_linears(pipes["bf16-plain"].generator)
        for pipe in pipes.values():  # the same random weights in every dtype
            pipe.generator.load_state_dict(reference.generator.state_dict())
            pipe.tokenizer.load_state_dict(reference.tokenizer.state_dict())
        del reference
        flops = 0.0
        if args.flops:
            with rows_as_given(), FlopCounterMode(display=False) as counter:  # the method's own FLOPs
                run(pipes[args.dtypes[0]], 1)
            flops = float(counter.get_total_flops())
        for batch in args.batch_sizes:
            times = {d: [] for d in pipes}
            for pipe in pipes.values():
                run(pipe, batch)  # warm-up
            for _ in range(args.repeats):
                for d, pipe in pipes.items():
                    t0 = time.perf_counter()
                    run(pipe, batch)
                    times[d].append(time.perf_counter() - t0)
            base = statistics.median(times[args.dtypes[0]])
            for d, t in times.items():
                med = statistics.median(t)
                line = f"{name:8} {batch:5d} {d:10} {med:8.2f} {min(t):7.2f} {max(t):7.2f} {med / batch:8.3f}"
                line += f" {base / med:6.2f}x"  # against the first dtype
                if args.flops:
                    line += f" {100 * flops * batch / med / peaks[d]:5.1f}%"
                print(line, flush=True)


if __name__ == "__main__":
    main()
