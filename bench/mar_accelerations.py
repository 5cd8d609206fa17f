"""MAR's accelerations against plain MAR in one run: DiSA (diffusion step annealing), fewer AR steps, both, and
guidance limited to an interval of the head's noise levels (or not, if the model's own settings limit it).

    python bench/mar_accelerations.py [--model mar] [--n 200] [--seeds 0] [--batch-sizes 1 8] [--repeats 3]
        [--threads 2] [--fewer-steps 8] [--disa-last N] [--cfg-interval LOW HIGH] [--json run.json]
        [--markdown table.md] [--quick]

For each setting: transformer NFE (sequential encoder-decoder passes), head evaluations (sequential calls of the
diffusion MLP, and the token rows it evaluates per image, guided rows included), seconds per image (generation +
decode) at each batch size with the settings interleaved within every repeat, FD as a multiple of the real-data
floor, class accuracy and recall (argen.eval, held-out mnist:test, the shipped classifier's features). `--model`
takes a MAR pipeline folder or shipped name. Every setting is the pipeline's own sampler defaults but for its
head's steps (all of them at every AR step, or DiSA's annealing) and AR steps.
"""

import argparse
import json

import torch
from tqdm import tqdm

from argen.cli.common import print_table
from argen.eval.evaluate import evaluate, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.speed import bench_sampling, matmul_peak_flops
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained


def settings(
    pipe: ARPipeline, fewer_steps: int, disa_last: int | None, cfg_interval: tuple[float, float]
) -> dict[str, dict]:
    """MAR with its head's `head_steps` at every AR step (no DiSA), DiSA from them down to `disa_last` (default: the
    pipeline's own `head_steps_last`, else 5), `fewer_steps` AR steps, both together, and DiSA with guidance at
    every noise level of the head if the pipeline limits it to an interval, else limited to `cfg_interval`."""
    own = pipe.config().options_for(pipe.generator.order)
    last = disa_last or own.head_steps_last or 5
    plain = {"head_steps_last": 0}
    disa = {"head_steps_last": last, "head_annealing": "linear"}
    other = (0.0, 1.0) if own.head_cfg_interval != (0.0, 1.0) else cfg_interval
    where = "every noise level" if other == (0.0, 1.0) else f"t/T in [{other[0]:g}, {other[1]:g}]"
    return {
        f"no DiSA ({own.steps} AR steps, {own.head_steps} head steps)": plain,
        f"DiSA {own.head_steps}->{last} (linear)": disa,
        f"{fewer_steps} AR steps": {"steps": fewer_steps, **plain},
        f"{fewer_steps} AR steps + DiSA": {"steps": fewer_steps, **disa},
        f"DiSA, guided at {where}": {**disa, "head_cfg_low": other[0], "head_cfg_high": other[1]},
    }


@torch.no_grad()
def head_evaluations(pipe: ARPipeline, sampler: dict, batch_size: int) -> tuple[int, float]:
    """(sequential head calls for one batch, token rows the head evaluates per image) counted by a forward hook
    on the head's network; rows include guidance's unconditional ones (not the zero rows layers.Linear adds)."""
    calls, rows = [0], [0]

    def count(module, inputs, output) -> None:
        calls[0] += 1
        rows[0] += inputs[0].shape[0]

    hook = pipe.generator.diffloss.net.register_forward_hook(count)
    try:
        pipe(torch.arange(batch_size) % pipe.generator.num_classes, seed=0, output_type="pt", **sampler)
    finally:
        hook.remove()
    return calls[0], rows[0] / batch_size


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    pipe = ARPipeline.from_pretrained(args.model)
    if pipe.generator.order.name != "mar":
        raise SystemExit(f"{args.model} is a {pipe.generator.order.name} pipeline, not MAR")
    chosen = settings(pipe, args.fewer_steps, args.disa_last, tuple(args.cfg_interval))
    runs = {name: (pipe, sampler) for name, sampler in chosen.items()}
    bar = tqdm(total=len(args.batch_sizes) * args.repeats * len(runs), desc="speed", unit="run")
    speed = bench_sampling(runs, args.batch_sizes, args.repeats, matmul_peak_flops(), bar)
    bar.close()
    features = ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))
    tc = pipe.tokenizer.config
    reference, rest = reference_sets("mnist", args.n, tc.image_size, tc.image_channels)
    records = []
    for name, (_, sampler) in tqdm(runs.items(), desc="quality", unit="setting"):
        by_batch = {r.batch_size: r for r in speed if r.setting == name}
        heads = {bs: head_evaluations(pipe, sampler, bs) for bs in args.batch_sizes}
        q = evaluate(pipe, reference, rest, features, args.seeds, features, **sampler) if args.n else None
        records.append(
            {
                "setting": name,
                "sampler": pipe.config(**sampler).flat(),
                "nfe": by_batch[args.batch_sizes[0]].nfe,
                "head_calls": {bs: h[0] for bs, h in heads.items()},
                "head_rows_per_image": {bs: h[1] for bs, h in heads.items()},
                "seconds_per_image": {bs: r.seconds_per_image for bs, r in by_batch.items()},
                "fd_multiple": q.fd_multiple if q else None,
                "fd_floor": q.fd_real_floor if q else None,
                "class_accuracy": q.class_accuracy.mean if q else None,
                "recall": q.recall.mean if q else None,
            }
        )
    return {
        "model": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
        "batch_sizes": args.batch_sizes,
        "n": args.n,
        "seeds": args.seeds,
        "results": records,
    }


def render(run: dict, markdown: str | None) -> None:
    sizes = [str(bs) for bs in run["batch_sizes"]]
    b = sizes[0]
    header = ["setting", "NFE", f"head calls b{b}", f"head rows/image b{b}"]
    header += [f"s/image b{bs}" for bs in sizes] + ["FD (x floor)", "class acc", "recall"]
    rows = []
    for r in run["results"]:
        quality = ["-", "-", "-"]
        if r["fd_multiple"] is not None:
            quality = [f"{r['fd_multiple']:.2f}x", f"{100 * r['class_accuracy']:.1f} %", f"{r['recall']:.2f}"]
        rows.append(
            [
                r["setting"],
                r["nfe"],
                r["head_calls"][b],
                f"{r['head_rows_per_image'][b]:.0f}",
                *(f"{r['seconds_per_image'][bs]:.4f}" for bs in sizes),
                *quality,
            ]
        )
    print(
        f"\n{run['model']}: {run['threads']} threads, {run['repeats']} interleaved repeats; seconds per image = "
        f"generation + decode; quality: N={run['n']}, seeds {run['seeds']}, FD against held-out mnist:test digits"
    )
    print_table(header, rows)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        with open(markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mar", help="a MAR pipeline folder or shipped name")
    p.add_argument("--n", type=int, default=200, help="images per seed for FD/accuracy (0: speed only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fewer-steps", type=int, default=8, help="AR steps of the 'fewer AR steps' settings")
    p.add_argument(
        "--disa-last", type=int, default=None, help="DiSA: the head's steps at the last AR step (default: the model's)"
    )
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=[0.4, 1.0],
        metavar=("LOW", "HIGH"),
        help="the head's noise levels guided in the last setting, if the model guides at every level",
    )
    p.add_argument("--json", help="also save the measurements")
    p.add_argument("--markdown", help="also write the table as markdown")
    p.add_argument("--from-json", help="render a saved run instead of measuring")
    p.add_argument("--quick", action="store_true", help="N=50, 1 repeat: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.n, args.repeats = 50, 1
    if args.from_json:
        with open(args.from_json) as f:
            run = json.load(f)
    else:
        run = json.loads(json.dumps(measure(args)))  # batch sizes become string keys, as when loaded
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=2)
    render(run, args.markdown)


if __name__ == "__main__":
    main()
