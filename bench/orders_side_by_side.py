"""Every generation order, and the fast options of each, on the same data, tokenizer family and evaluation, in one run.

    python bench/orders_side_by_side.py [--models raster next-scale masked random-order mar] [--n 1000] [--seeds 0 1 2]
        [--batch-sizes 1 8] [--repeats 5] [--threads 2] [--markdown t.md] [--json run.json] [--svg plot.svg]
        [--model NAME=PIPELINE_FOLDER ...] [--quick] [--update saved.json]

For each order: parameters, NFE (sequential forward passes of the generator), seconds per image (generation +
decode) at each batch size with all settings interleaved within every repeat (machine load hits them alike), FD
as a multiple of the real-data floor, class accuracy, and test NLL in bits/token where the order defines a
likelihood. All orders are judged on the same held-out reference set, feature extractor and N. `--model` points
an order at a pipeline folder (e.g. a model not shipped yet).
"""

import argparse
import json

import torch
from tqdm import tqdm

from argen.eval.evaluate import evaluate, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.report import Point, scatter_svg
from argen.eval.speed import bench_sampling, matmul_peak_flops
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained

# The settings of each order: its plain sampler first, then its fast options (lossless ones say so).
SETTINGS = {
    "raster": {
        "plain": {},
        "MC-SJD, window 16 (lossless)": {"speculative": "mc-sjd", "window": 16},
        "ZipAR, window 3": {"parallel_window": 3},
    },
    "next-scale": {
        "plain": {},
        "FastVAR prune 0.25": {"prune": 0.25, "prune_scales": 1},
        # the defaults shipped until session 22, CFG alone: what its guide model costs and buys
        "no guide (cfg 1.75, T 1.15)": {"guide_scale": 1.0, "cfg_scale": 1.75, "temperature": 1.15},
    },
    "masked": {"plain": {}, "8 steps": {"steps": 8}},
    "random-order": {
        "plain": {},
        "20 steps (parallel)": {"steps": 20},
        "raster order": {"order": "raster"},
        "MC-SJD, window 8 (lossless)": {"speculative": "mc-sjd", "window": 8},
    },
    # plain MAR anneals its head's steps from 100 to 10 already (DiSA, its pipeline's defaults)
    "mar": {"plain": {}, "DiSA ending at 5 head steps": {"head_steps_last": 5}, "half the AR steps": {"steps": 8}},
}


def measure(args: argparse.Namespace, where: dict[str, str]) -> dict:
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    features = ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))
    pipes = {order: ARPipeline.from_pretrained(where.get(order, order)) for order in args.models}
    runs = {
        (order, name): (pipe, sampler) for order, pipe in pipes.items() for name, sampler in SETTINGS[order].items()
    }
    labelled = {f"{order}: {name}": run for (order, name), run in runs.items()}
    bar = tqdm(total=len(args.batch_sizes) * args.repeats * len(labelled), desc="speed", unit="run")
    speed = bench_sampling(labelled, args.batch_sizes, args.repeats, peak, bar)
    bar.close()
    records = []
    for (order, name), (pipe, sampler) in tqdm(runs.items(), desc="quality", unit="setting"):
        tc = pipe.tokenizer.config
        reference, rest = reference_sets("mnist", args.n, tc.image_size, tc.image_channels)
        q = evaluate(pipe, reference, rest, features, args.seeds, features, **sampler)
        by_batch = {r.batch_size: r for r in speed if r.setting == f"{order}: {name}"}
        records.append(
            {
                "order": order,
                "setting": name,
                "sampler": q.sampler,
                "parameters": sum(p.numel() for p in pipe.generator.parameters()),
                "guide_parameters": sum(p.numel() for p in pipe.guide.parameters()) if guided(q.sampler) else 0,
                "tokens": pipe.generator.seq_len,
                "nfe": by_batch[args.batch_sizes[0]].nfe,
                "seconds_per_image": {bs: r.seconds_per_image for bs, r in by_batch.items()},
                "fd": [q.fd.mean, q.fd.std],
                "fd_floor": q.fd_real_floor,
                "fd_multiple": q.fd_multiple,
                "class_accuracy": [q.class_accuracy.mean, q.class_accuracy.std],
                "recall": q.recall.mean,
                "bits_per_token": q.bits_per_token,
            }
        )
    return {
        "threads": args.threads,
        "repeats": args.repeats,
        "batch_sizes": args.batch_sizes,
        "n": args.n,
        "seeds": args.seeds,
        "results": records,
    }


def guided(sampler: dict) -> bool:
    """Whether a setting runs the pipeline's guide model beside the generator (autoguidance)."""
    return sampler.get("guide_scale", 1.0) != 1.0


def params(r: dict) -> str:
    guide = r.get("guide_parameters")  # absent in runs saved before session 22
    return f"{r['parameters'] / 1e6:.2f} M" + (f" + {guide / 1e6:.2f} M guide" if guide else "")


def render(run: dict, args: argparse.Namespace) -> None:
    sizes = [str(bs) for bs in run["batch_sizes"]]
    header = ["order", "setting", "params", "NFE", *(f"s/image b{bs}" for bs in sizes), "FD (× floor)"]
    header += ["class acc", "recall", "bits/token"]
    rows = []
    for r in run["results"]:
        bits = "-" if r["bits_per_token"] is None else f"{r['bits_per_token']:.3f}"
        rows.append(
            [
                r["order"],
                r["setting"],
                params(r),
                r["nfe"],
                *(f"{r['seconds_per_image'][bs]:.4f}" for bs in sizes),
                f"{r['fd'][0]:.3g} ± {r['fd'][1]:.2g} ({r['fd_multiple']:.2f}×)",
                f"{100 * r['class_accuracy'][0]:.1f} %",
                f"{r['recall']:.2f}",
                bits,
            ]
        )
    print(
        f"\n{run['threads']} threads, {run['repeats']} interleaved repeats; seconds per image = generation + decode; "
        f"quality: N={run['n']}, seeds {run['seeds']}, FD against held-out mnist:test digits"
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
        b = sizes[-1]
        points = [
            Point(f"{r['order']} {r['setting'].split(' (')[0]}", r["seconds_per_image"][b], r["fd_multiple"], 0.0)
            for r in run["results"]
        ]
        with open(args.svg, "w") as f:
            f.write(scatter_svg(points, f"seconds per image at batch {b}", f"FD / real floor (N = {run['n']})"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--model", action="append", default=[], metavar="ORDER=FOLDER", help="an order's pipeline folder")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", help="also write the table as markdown")
    p.add_argument("--json", help="also save the measurements")
    p.add_argument("--svg", help="also draw FD (× floor) against seconds per image at the largest batch")
    p.add_argument("--from-json", help="render a saved run instead of measuring")
    p.add_argument(
        "--update",
        help="a saved run: measure only --models and put their rows in it (replacing theirs), keeping the others; "
        "its speed figures then come from two runs, not one",
    )
    p.add_argument("--quick", action="store_true", help="N=100, one seed, 1 repeat: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.n, args.seeds, args.repeats = 100, [0], 1
    if args.from_json:
        with open(args.from_json) as f:
            run = json.load(f)
    else:
        where = dict(item.split("=", 1) for item in args.model)
        run = json.loads(json.dumps(measure(args, where)))  # batch sizes become string keys, as when loaded
        if args.update:
            with open(args.update) as f:
                saved = json.load(f)
            if saved["batch_sizes"] != run["batch_sizes"] or saved["n"] != run["n"]:
                raise SystemExit(f"--update {args.update}: its batch sizes and N differ from this run's")
            kept = [r for r in saved["results"] if r["order"] not in args.models]
            updated = sorted(set(saved.get("updated", [])) | set(args.models))  # every order measured apart
            run = {**saved, "results": kept + run["results"], "updated": updated}
            args.json = args.json or args.update
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=2)
    render(run, args)


if __name__ == "__main__":
    main()
