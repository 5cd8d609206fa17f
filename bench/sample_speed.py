"""Sampling speed of a pipeline: seconds per image at several batch sizes, token generation and decode apart.

    python bench/sample_speed.py [--model default] [--batch-sizes 1 8] [--repeats 5]

Warm-up runs are excluded; prints the median (min-max) over repeats.
"""

import argparse
import statistics
import time

import torch

from argen.pipeline import ARPipeline
from argen.sampling.decode import generate, seeded_generators


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ARPipeline.from_pretrained(args.model)
    config = pipe.sampler
    print(f"model {args.model}: {pipe.generator.seq_len} tokens/image, sampler {config}, {args.threads} threads")
    print(f"{'batch':>5} {'s/image':>18} {'tokens s/image':>15} {'decode s/image':>15} {'images/s':>9}")
    for bs in args.batch_sizes:
        labels = torch.arange(bs) % pipe.generator.num_classes
        gen_t, dec_t = [], []
        for r in range(args.repeats + 1):
            ids = {}
            g = timed(lambda: ids.setdefault("x", generate(pipe.generator, labels, config,
                                                           seeded_generators(range(r * bs, (r + 1) * bs)))))
            with torch.no_grad():
                d = timed(lambda: pipe.tokenizer.decode(ids["x"]))
            if r:  # the first run warms up
                gen_t.append(g / bs)
                dec_t.append(d / bs)
        total = [a + b for a, b in zip(gen_t, dec_t, strict=True)]
        med = statistics.median(total)
        print(f"{bs:>5} {med:>8.4f} ({min(total):.4f}-{max(total):.4f}) {statistics.median(gen_t):>15.4f} "
              f"{statistics.median(dec_t):>15.4f} {1 / med:>9.1f}")


if __name__ == "__main__":
    main()
