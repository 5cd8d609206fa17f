"""Raster (LlamaGen-style) vs next-scale (VAR-style) on the shipped MNIST models, measured in one run.

    python bench/orders_side_by_side.py [--n 1000] [--seeds 0 1] [--repeats 5] [--threads 2]

Speed runs are interleaved (raster, next-scale, raster, ...) so machine load hits both alike; quality uses the
same held-out reference set, feature extractor and N for both.
"""

import argparse

import torch

from argen.eval.evaluate import evaluate, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.speed import bench_sampling, matmul_peak_flops
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["raster", "next-scale"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {name: ARPipeline.from_pretrained(name) for name in args.models}
    peak = matmul_peak_flops()
    speed = bench_sampling({name: (pipe, {}) for name, pipe in pipes.items()}, args.batch_sizes, args.repeats, peak)
    features = ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))
    quality = {}
    for name, pipe in pipes.items():
        tc = pipe.tokenizer.config
        reference, rest = reference_sets("mnist", args.n, tc.image_size, tc.image_channels)
        quality[name] = evaluate(pipe, reference, rest, features, args.seeds, features)
    print(f"{args.threads} threads, matmul peak {peak / 1e9:.1f} GFLOP/s; quality: N={args.n}, seeds {args.seeds}")
    header = [
        "model",
        "tokens",
        "batch",
        "NFE",
        "s/image (min-max)",
        "GFLOP/image",
        "FD",
        "FD floor",
        "class acc",
        "bits/token",
    ]
    rows = []
    for r in speed:
        q = quality[r.setting]
        rows.append(
            [
                r.setting,
                pipes[r.setting].generator.seq_len,
                r.batch_size,
                r.nfe,
                f"{r.seconds_per_image:.4f} ({r.seconds_per_image_min:.4f}-{r.seconds_per_image_max:.4f})",
                f"{r.flops_per_image / 1e9:.3f}",
                str(q.fd),
                f"{q.fd_real_floor:.3g}",
                str(q.class_accuracy),
                f"{q.bits_per_token:.3f}",
            ]
        )
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    base = args.models[0]
    for bs in args.batch_sizes:
        b = next(r for r in speed if r.setting == base and r.batch_size == bs)
        for r in speed:
            if r.batch_size == bs and r.setting != base:
                print(
                    f"batch {bs}: {r.setting} / {base}: NFE x{r.nfe / b.nfe:.3f}, "
                    f"time x{r.seconds_per_image / b.seconds_per_image:.3f}"
                )


if __name__ == "__main__":
    main()
