"""Every fast-sampling option against the plain sampler, on the shipped MNIST models, in one run.

    python bench/fast_sampling.py [--n 1000] [--seeds 0 1] [--batch-sizes 1 8] [--repeats 5] [--threads 2]
                                  [--markdown table.md] [--json out.json] [--quick]

Speed: NFE (sequential target forward passes), seconds per image (generation + decode) at each batch size,
settings interleaved within every repeat so machine load hits them alike, ratios against the plain sampler of
the same model; the speculative acceptance rate; for next-scale, the most KV-cache entries held at once.
Quality: FD and class accuracy (classifier features, N samples per seed, held-out reference), and the FD change
against the plain sampler of the same model.
"""

import argparse
import json

import torch
from tqdm import tqdm

from argen.eval.evaluate import evaluate, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.report import Point, scatter_svg
from argen.eval.speed import bench_sampling, matmul_peak_flops
from argen.models.interface import NoOptions
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained

RASTER = {
    "plain": {},
    "SJD, window 8": {"speculative": "sjd", "window": 8},
    "MC-SJD, window 16": {"speculative": "mc-sjd", "window": 16},
    "draft model, window 4": {"speculative": "draft", "window": 4},
    "LANTERN (MC-SJD 16, k 8, δ 0.1)": {"speculative": "mc-sjd", "window": 16, "relax_k": 8, "relax_delta": 0.1},
    "LANTERN (MC-SJD 16, k 8, δ 0.3)": {"speculative": "mc-sjd", "window": 16, "relax_k": 8, "relax_delta": 0.3},
    "ZipAR, window 1": {"parallel_window": 1},
    "ZipAR, window 3": {"parallel_window": 3},
}
NEXT_SCALE = {
    "plain": {},
    "FastVAR prune 0.25 (7×7 map)": {"prune": 0.25, "prune_scales": 1},
    "FastVAR prune 0.5 (7×7 map)": {"prune": 0.5, "prune_scales": 1},
    "FastVAR prune 0.5 (7×7, 6×6 at 0.25)": {"prune": 0.5, "prune_scales": 2},
    "ScaleKV budget 32": {"kv_budget": 32},
    "ScaleKV budget 16": {"kv_budget": 16},
}
LOSSLESS = {"plain", "SJD, window 8", "MC-SJD, window 16", "draft model, window 4"}


def _short(name: str) -> str:
    """A plot label: 'MC-SJD, window 16' -> 'MC-SJD 16', 'LANTERN (MC-SJD 16, k 8, δ 0.1)' -> 'LANTERN δ 0.1'."""
    if name.startswith("LANTERN"):
        return "LANTERN " + name.split(", ")[-1].rstrip(")")
    if "6×6" in name:
        return name.split(" (")[0].replace("FastVAR ", "") + " (2 maps)"
    return name.split(" (")[0].replace(", window", "").replace("FastVAR ", "").replace("ScaleKV budget", "KV")


@torch.no_grad()
def kv_peak(pipe: ARPipeline, sampler: dict, batch: int = 8) -> int | None:
    """Most KV entries (all layers, per row) the next-scale cache holds while decoding (argmax tokens)."""
    model = pipe.generator
    if model.order.options_class is NoOptions:
        return None
    config = pipe.config(**sampler)
    state = model.start(torch.arange(batch) % model.num_classes, config.options_for(model.order))
    while not state.done:
        prediction = model.predict(state)
        model.advance(state, prediction.positions, prediction.logits.argmax(-1))
    return state.cache.peak


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    features = ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))
    records = []
    for model in args.models:
        settings = {"raster": RASTER, "next-scale": NEXT_SCALE}[model]
        pipe = ARPipeline.from_pretrained(model)
        runs = {name: (pipe, sampler) for name, sampler in settings.items()}
        bar = tqdm(total=len(args.batch_sizes) * args.repeats * len(runs), desc=f"{model} speed", unit="run")
        speed = bench_sampling(runs, args.batch_sizes, args.repeats, peak, bar)
        bar.close()
        tc = pipe.tokenizer.config
        reference, rest = reference_sets("mnist", args.n, tc.image_size, tc.image_channels)
        quality = {}
        for name, sampler in tqdm(settings.items(), desc=f"{model} quality", unit="setting"):
            quality[name] = evaluate(pipe, reference, rest, features, args.seeds, features, **sampler)
        plain = {r.batch_size: r for r in speed if r.setting == "plain"}
        b1 = args.batch_sizes[0]
        for name in settings:
            q = quality[name]
            by_batch = {r.batch_size: r for r in speed if r.setting == name}
            records.append(
                {
                    "model": model,
                    "setting": name,
                    "sampler": settings[name],
                    "nfe": by_batch[b1].nfe,
                    "nfe_ratio": by_batch[b1].nfe / plain[b1].nfe,
                    "seconds_per_image": {bs: r.seconds_per_image for bs, r in by_batch.items()},
                    "time_ratio": {
                        bs: r.seconds_per_image / plain[bs].seconds_per_image for bs, r in by_batch.items()
                    },
                    "acceptance": by_batch[b1].acceptance,
                    "kv_peak": kv_peak(pipe, settings[name]),
                    "fd": [q.fd.mean, q.fd.std],
                    "fd_change": q.fd.mean / quality["plain"].fd.mean - 1,
                    "class_accuracy": [q.class_accuracy.mean, q.class_accuracy.std],
                    "lossless": model == "raster" and name in LOSSLESS,
                }
            )
    return {
        "threads": args.threads,
        "matmul_peak_flops": peak,
        "repeats": args.repeats,
        "batch_sizes": args.batch_sizes,
        "n": args.n,
        "seeds": args.seeds,
        "results": records,
    }


def render(run: dict, args: argparse.Namespace) -> None:
    """Print the table; write it as markdown and the FD-vs-time plots when asked."""
    sizes = run["batch_sizes"]
    header = ["model", "setting", "NFE", *(f"time b{bs}" for bs in sizes), "accepted", "KV peak", "FD"]
    header += ["FD change", "class acc"]
    rows = []
    for r in run["results"]:
        rows.append(
            [
                r["model"],
                r["setting"],
                f"{r['nfe']} ({r['nfe_ratio']:.2f}×)",
                *(f"{r['time_ratio'][str(bs)]:.2f}×" for bs in sizes),
                "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                "-" if r["kv_peak"] is None else str(r["kv_peak"]),
                f"{r['fd'][0]:.4g} ± {r['fd'][1]:.2g}",
                "-" if r["setting"] == "plain" else f"{100 * r['fd_change']:+.0f} %",
                f"{100 * r['class_accuracy'][0]:.1f} %",
            ]
        )
    print(
        f"\n{run['threads']} threads, matmul peak {run['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; time = seconds per "
        f"image (generation + decode) relative to the plain sampler of the same model, {run['repeats']} "
        f"interleaved repeats; quality: N={run['n']}, seeds {run['seeds']}"
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.svg:
        b1 = str(sizes[0])
        for model in ("raster", "next-scale"):
            results = [r for r in run["results"] if r["model"] == model]
            # settings far worse than plain would squash the rest: they stay in the table
            shown = [r for r in results if r["fd_change"] < 0.5]
            off = ", ".join(_short(r["setting"]) for r in results if r["fd_change"] >= 0.5)
            points = [Point(_short(r["setting"]), r["time_ratio"][b1], *r["fd"]) for r in shown]
            x_label = f"seconds per image at batch {b1}, relative to plain" + (
                f" (off the plot: {off})" if off else ""
            )
            with open(args.svg.format(model=model), "w") as f:
                f.write(scatter_svg(points, x_label, f"FD, {model} (N = {run['n']})", y_from_zero=False))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", help="also write the table as markdown")
    p.add_argument("--json", help="also save the measurements")
    p.add_argument("--svg", help="also draw FD against the batch-1 time ratio (a PATH with {model})")
    p.add_argument("--models", nargs="+", choices=["raster", "next-scale"], default=["raster", "next-scale"])
    p.add_argument("--from-json", help="render a saved run instead of measuring")
    p.add_argument("--update", help="measure --models again and replace their rows in this saved run")
    p.add_argument("--quick", action="store_true", help="N=100, one seed, 2 repeats: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.n, args.seeds, args.repeats = 100, [0], 2
    if args.from_json:
        with open(args.from_json) as f:
            run = json.load(f)
    else:
        run = json.loads(json.dumps(measure(args)))  # batch sizes become string keys, as when loaded
        if args.update:
            with open(args.update) as f:
                saved = json.load(f)
            kept = [r for r in saved["results"] if r["model"] not in args.models]
            run["results"] = sorted(kept + run["results"], key=lambda r: r["model"] != "raster")
            run["updated_models"] = args.models
            args.json = args.json or args.update
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=2)
    render(run, args)


if __name__ == "__main__":
    main()
