"""What batch invariance costs: every shipped model sampled with `layers.Linear`'s few-row padding (the default)
and without it (`layers.rows_as_given`), interleaved within each repeat, in one run.

    python bench/row_padding.py [--models raster masked random-order next-scale mar] [--batch-sizes 1 8]
        [--repeats 5] [--threads 2]

Prints, per model and batch size, seconds per image (generation + decode, the pipeline's own sampler defaults;
median and best of the repeats) padded and unpadded, their ratio, and whether the two runs drew the same tokens.
Also the padding this CPU needs: the rows each of the generator's linear shapes is padded to.
"""

import argparse
import statistics
import time

import torch

from argen.cli.common import print_table
from argen.models import layers
from argen.pipeline import ARPipeline


@torch.no_grad()
def run(pipe: ARPipeline, batch: int, padded: bool) -> tuple[float, torch.Tensor]:
    labels = torch.arange(batch) % pipe.generator.num_classes
    t0 = time.perf_counter()
    if padded:
        out = pipe(labels, seed=0, output_type="pt")
    else:
        with layers.rows_as_given():
            out = pipe(labels, seed=0, output_type="pt")
    return time.perf_counter() - t0, out.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["raster", "masked", "random-order", "next-scale", "mar"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        pipe = ARPipeline.from_pretrained(name)
        for batch in args.batch_sizes:
            times = {True: [], False: []}
            tokens = {}
            for padded in (True, False):  # warm-up (and the per-shape probes)
                run(pipe, batch, padded)
            for _ in range(args.repeats):
                for padded in (True, False):
                    seconds, tokens[padded] = run(pipe, batch, padded)
                    times[padded].append(seconds / batch)
            med = {p: statistics.median(t) for p, t in times.items()}
            rows.append(
                [
                    name,
                    batch,
                    f"{med[True]:.3f} (best {min(times[True]):.3f})",
                    f"{med[False]:.3f} (best {min(times[False]):.3f})",
                    f"{med[True] / med[False]:.2f}x",
                    "yes" if torch.equal(tokens[True], tokens[False]) else "no",
                ]
            )
            print_table(["model", "batch", "padded s/img", "unpadded s/img", "ratio", "same tokens"], rows[-1:])
    print()
    print_table(["model", "batch", "padded s/img", "unpadded s/img", "ratio", "same tokens"], rows)
    print(f"\nCPU: {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads. Rows each product is padded to:")
    print_table(
        ["kernel", "out", "bias", "in", "dtype", "device", "autocast", "threads", "rows"],
        [[*key, rows] for key, rows in sorted(layers.padded_rows().items(), key=str)],
    )


if __name__ == "__main__":
    main()
