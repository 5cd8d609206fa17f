"""FastVAR pruning and ScaleKV budgets on the released VAR-d16 architecture at 256×256 (10 scales, 680 tokens).

    python bench/next_scale_at_scale.py [--depth 16] [--batch 1] [--repeats 2] [--threads 2]

The weights are random: quality needs the official checkpoint (`argen.convert.var`, which needs internet), so
this measures only what does not depend on the weights, side by side in one run: seconds per image of the
generator (guided, as VAR samples) and the most KV-cache memory it holds. The shipped 28×28 model's largest
map is 7×7; here the two largest are 16×16 and 13×13, the regime FastVAR and ScaleKV were designed for.
"""

import argparse
import statistics
import time

import torch

from argen.models.interface import Condition
from argen.models.next_scale import NEXT_SCALE_PRESETS, NextScaleTransformer
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import generate, seeded_generators
from argen.sampling.guidance import with_null_rows
from argen.tokenizers.multiscale import MULTISCALE_PRESETS, MultiScaleVQ

SETTINGS = {
    "plain": {},
    "FastVAR prune 0.5 (16×16; 13×13 at 0.25)": {"prune": 0.5, "prune_scales": 2},
    "FastVAR prune 0.75 (16×16; 13×13 at 0.375)": {"prune": 0.75, "prune_scales": 2},
    "ScaleKV budget 256 (1 drafter)": {"kv_budget": 256},
    "ScaleKV budget 128 (1 drafter)": {"kv_budget": 128},
}


@torch.no_grad()
def kv_megabytes(model: NextScaleTransformer, labels: torch.Tensor, config: SamplerConfig) -> float:
    """Peak KV memory of a guided decode (conditional + unconditional rows), float32."""
    rows = with_null_rows(Condition.classes(labels))
    state = model.start(rows, config.options_for(model.order))
    while not state.done:
        prediction = model.predict(state)
        model.advance(state, prediction.positions, prediction.logits.argmax(-1))
    return state.cache.peak * 2 * model.config.dim * 4 * len(rows) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = MultiScaleVQ(MULTISCALE_PRESETS["var-vae-256"]).eval()
    model = NextScaleTransformer(NEXT_SCALE_PRESETS[f"var-d{args.depth}"]).eval().bind(tokenizer)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    labels = torch.arange(args.batch) % model.num_classes
    configs = {
        name: SamplerConfig.from_flat(dict(cfg_scale=5.0, cfg_schedule="var_ramp", top_k=900, **s))
        for name, s in SETTINGS.items()
    }
    times = {name: [] for name in configs}
    for config in configs.values():  # warm-up
        generate(model, labels, config, seeded_generators(range(args.batch)))
    for r in range(args.repeats):
        for name, config in configs.items():
            t0 = time.perf_counter()
            generate(model, labels, config, seeded_generators(range(r, r + args.batch)))
            times[name].append((time.perf_counter() - t0) / args.batch)
    print(
        f"VAR-d{args.depth} ({params:.0f} M parameters, random weights), 256×256, {model.seq_len} tokens, "
        f"batch {args.batch}, {args.threads} threads, guided (2 rows per image), {args.repeats} interleaved repeats"
    )
    base = statistics.median(times["plain"])
    base_mb = kv_megabytes(model, labels, configs["plain"])
    header = ["setting", "s/image", "speed-up", "KV cache MB", "KV ratio"]
    rows = []
    for name, config in configs.items():
        t, mb = statistics.median(times[name]), kv_megabytes(model, labels, config)
        rows.append([name, f"{t:.2f}", f"{base / t:.2f}×", f"{mb:.0f}", f"{mb / base_mb:.2f}×"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
