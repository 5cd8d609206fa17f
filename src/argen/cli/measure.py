"""`argen eval`, `eval-tokenizer`, `bench`, `report`: measuring quality and speed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from argen.cli.common import (
    DTYPES,
    check_for_model,
    check_image_count,
    classifier_path,
    compile_if_asked,
    load_tokenizer,
    parse_setting,
    print_table,
    sampler_overrides,
)
from argen.errors import ConfigError
from argen.storage import save_npz


def cmd_eval(args: argparse.Namespace) -> None:
    """Under torchrun every rank samples a share of each seed's batches; rank 0 scores, prints and writes."""
    from argen.train.distributed import cleanup, setup

    info = setup(args.device or "cpu")  # a bare --device cuda is each rank's own GPU
    try:
        _evaluate_and_report(args, info)
    finally:
        cleanup(info)


def _evaluate_and_report(args: argparse.Namespace, info) -> None:
    from argen.eval.evaluate import evaluate, reference_sets, sample_uint8
    from argen.eval.features import ClassifierFeatures, inception_features
    from argen.pipeline import ARPipeline
    from argen.pretrained import atomic_write, load_pretrained
    from argen.train.distributed import run_on_main

    check_image_count(len(args.seeds), args.n, what="per seed")
    sampler = sampler_overrides(args)
    pipe = ARPipeline.from_pretrained(args.model, device=info.device, torch_dtype=DTYPES[args.dtype])
    check_for_model(pipe, sampler)
    compile_if_asked(pipe, args)
    tc = pipe.tokenizer.config
    # The real images are read by rank 0 alone; the other ranks only sample.
    sets = run_on_main(lambda: reference_sets(args.data, args.n, tc.image_size, tc.image_channels), share=False)
    reference, rest = sets or (None, None)
    classifier = ClassifierFeatures(load_pretrained(classifier_path(args.classifier))) if args.classifier else None
    if args.features == "inception":
        try:
            extractor = inception_features(args.inception_weights)
        except RuntimeError as e:
            print(f"skipping Inception FID: {e}", file=sys.stderr)
            return
    else:
        if classifier is None:
            raise ConfigError("--features classifier needs --classifier")
        extractor = classifier
    common = dict(classifier=classifier, batch_size=args.batch_size, dist_info=info)
    if args.sweep:
        _sweep_and_report(args, pipe, reference, rest, extractor, common, sampler, info)
        return
    report = evaluate(pipe, reference, rest, extractor, args.seeds, **common, **sampler)
    effective = pipe.config(**sampler)
    guided = effective.cfg_scale != 1.0 or effective.guide_scale != 1.0
    reports = {"guided" if guided else "unguided": report}
    if args.unguided and guided:  # neither classifier-free guidance nor autoguidance
        unguided = {**sampler, "cfg_scale": 1.0, "guide_scale": 1.0}
        reports["unguided"] = evaluate(pipe, reference, rest, extractor, args.seeds, **common, **unguided)
    npz = sample_uint8(pipe, args.n, args.seeds[0], args.batch_size, info, **sampler) if args.npz else None
    if not info.is_main:
        return
    print(f"model {args.model}, sampler {report.sampler}")
    print(
        f"N = {report.num_samples} generated (class-balanced) vs {report.num_samples} held-out real images, "
        f"seeds {report.seeds} (mean ± std over seeds)"
    )
    table = [r.rows() for r in reports.values()]
    print_table(
        ["metric", *reports], [[name, *(rows[i][1] for rows in table)] for i, (name, _) in enumerate(table[0])]
    )
    if report.below_bar():
        print(f"warning: {args.model} is below the quality bar: {'; '.join(report.below_bar())}", file=sys.stderr)
    if args.json:
        data = {name: dataclasses.asdict(r) | {"fd_multiple": r.fd_multiple} for name, r in reports.items()}
        atomic_write(Path(args.json), lambda t: Path(t).write_text(json.dumps(data, indent=2)))
    if npz is not None:
        images, labels = npz
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # the ADM evaluator expects RGB
        save_npz(args.npz, arr_0=images, labels=labels.numpy().astype(np.int64))
        print(f"wrote {len(images)} samples to {args.npz} (arr_0: uint8 NHWC, the ADM evaluator layout)")


def _sweep_and_report(args, pipe, reference, rest, extractor, common, sampler, info) -> None:
    """`argen eval --sweep`: every setting on one protocol, the table with the frontier starred, JSON and SVG."""
    from argen.eval.sweep import frontier_svg, grid, parse_axes, rows, sweep
    from argen.storage import atomic_write

    axes = parse_axes(args.sweep)
    total = len(grid(axes))

    def progress(i: int, n: int, setting: dict) -> None:
        if info.is_main:
            print(f"[{i + 1}/{n}] {', '.join(f'{k}={v}' for k, v in setting.items())}", file=sys.stderr, flush=True)

    points = sweep(pipe, reference, rest, extractor, args.seeds, axes, progress=progress, **common, **sampler)
    if not info.is_main:
        return
    floor = points[0].report.fd_real_floor
    base = {k: v for k, v in points[0].report.sampler.items() if k not in axes}
    print(f"model {args.model}: {total} settings of {', '.join(axes)}; every other sampler field as in {base}")
    print(
        f"N = {args.n} per seed, seeds {args.seeds}, real-data floor FD {floor:.4g}; "
        "* = on the frontier (no other setting has both lower FD and higher accuracy)"
    )
    print_table(["setting", "FD (x floor)", "accuracy", "recall", "near-copies", "bar", "frontier"], rows(points))
    if args.json:
        data = [
            {"settings": p.settings, "on_frontier": p.on_frontier, "fd_multiple": p.report.fd_multiple}
            | dataclasses.asdict(p.report)
            for p in points
        ]
        atomic_write(Path(args.json), lambda t: Path(t).write_text(json.dumps(data, indent=2)))
    if args.plot:
        atomic_write(Path(args.plot), lambda t: Path(t).write_text(frontier_svg(points)))
        print(f"wrote the frontier plot to {args.plot}")


def cmd_eval_tokenizer(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.eval.tokenizer import LatentReport, evaluate_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    data = load_dataset(args.data, tokenizer.config.image_size, tokenizer.config.image_channels)
    r = evaluate_tokenizer(tokenizer, data)
    rows = [["images", r.num_images], ["MSE (pixels in [0, 1])", f"{r.mse:.5f}"], ["PSNR (dB)", f"{r.psnr:.2f}"]]
    if args.classifier != "none":
        rows.append(_reconstruction_fd_row(args, tokenizer))
    if isinstance(r, LatentReport):  # a KL tokenizer: how its latents are spread
        stats = zip(r.channel_mean, r.channel_std, strict=True)
        rows += [[f"latent channel {i} mean / std", f"{m:+.3f} / {s:.3f}"] for i, (m, s) in enumerate(stats)]
        rows += [
            ["latent std (all values)", f"{r.std:.4f} (scale factor 1/std = {1 / r.std:.4f})"],
            ["KL per image (nats)", f"{r.kl:.1f}"],
        ]
    else:
        rows += [
            ["codebook usage", f"{r.codebook_usage:.3f} of {tokenizer.vocab_size}"],
            ["codebook perplexity", f"{r.codebook_perplexity:.1f}"],
        ]
        if r.scale_perplexity:
            per_scale = ", ".join(f"{pn}x{pn}: {v:.1f}" for pn, v in r.scale_perplexity)
            rows.append(["perplexity per scale", per_scale])
    print_table(["metric", "value"], rows)


def _reconstruction_fd_row(args: argparse.Namespace, tokenizer) -> list[str]:
    """The anchor for generators on this tokenizer (their FD against the same reference can at best reach it); a
    data set too small for -n gets the reason in its place, the other figures still print."""
    from argen.eval.evaluate import reconstruction_fd, reference_sets
    from argen.eval.features import ClassifierFeatures
    from argen.pretrained import load_pretrained

    name = f"reconstruction FD, N = {args.n}"
    tc = tokenizer.config
    try:
        reference, rest = reference_sets(args.data, args.n, tc.image_size, tc.image_channels)
    except ValueError as e:
        return [name, f"skipped: {e} (lower -n)"]
    features = ClassifierFeatures(load_pretrained(classifier_path(args.classifier)))
    fd, floor = reconstruction_fd(tokenizer, reference, rest, features)
    return [f"{name} (real-data floor {floor:.4g})", f"{fd:.4g} ({fd / floor:.2f}x floor)"]


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from argen.eval.speed import bench_sampling, bench_training, matmul_peak_flops
    from argen.pipeline import ARPipeline
    from argen.pretrained import atomic_write

    torch.set_num_threads(args.threads)
    settings = dict(parse_setting(s) for s in (args.setting or ["default"]))
    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu", torch_dtype=DTYPES[args.dtype])
    for name, fields in settings.items():
        check_for_model(pipe, fields, f"--setting {name}")
    peak = matmul_peak_flops(device=pipe.device, dtype=DTYPES[args.dtype])
    print(
        f"model {args.model}: {pipe.generator.seq_len} tokens/image; {args.threads} threads; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    bar = tqdm(total=len(args.batch_sizes) * args.repeats * len(settings), desc="bench", unit="run", leave=False)
    runs = {name: (pipe, sampler) for name, sampler in settings.items()}
    results = bench_sampling(runs, args.batch_sizes, args.repeats, peak, bar)
    bar.close()
    rows = [
        [
            r.setting,
            r.batch_size,
            r.nfe,
            f"{r.seconds_per_image:.4f} ({r.seconds_per_image_min:.4f}-{r.seconds_per_image_max:.4f})",
            f"{r.images_per_second:.1f}",
            f"{r.peak_memory_mb:.0f}",
            f"{r.flops_per_image / 1e9:.3f}",
            f"{r.peak_ratio:.3f}",
            "-" if r.acceptance is None else f"{r.acceptance:.3f}",
        ]
        for r in results
    ]
    header = ["setting", "batch", "NFE", "s/image median (min-max)", "images/s", "peak MB", "GFLOP/image", "of peak"]
    print_table([*header, "accepted"], rows)
    base = next(iter(settings))
    if len(settings) > 1:
        print(f"\nratios against {base!r}, measured interleaved in this run:")
        ratio_rows = []
        for r in results:
            b = next(x for x in results if x.setting == base and x.batch_size == r.batch_size)
            if r.setting != base:
                ratio_rows.append(
                    [
                        r.setting,
                        r.batch_size,
                        f"{r.nfe / b.nfe:.3f}",
                        f"{r.seconds_per_image / b.seconds_per_image:.3f}",
                    ]
                )
        print_table(["setting", "batch", "NFE ratio", "time ratio"], ratio_rows)
    out = {
        "model": str(args.model),
        "threads": args.threads,
        "matmul_peak_flops": peak,
        "sampling": [dataclasses.asdict(r) for r in results],
    }
    if args.train:
        t = bench_training(pipe, peak=peak)
        out["training"] = t
        print(
            f"\ntraining: {t['tokens_per_second']:,.0f} tokens/s at batch {t['batch_size']} "
            f"({t['peak_ratio']:.3f} of peak)"
        )
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2)))


def cmd_report(args: argparse.Namespace) -> None:
    from argen.eval.report_page import build_report

    path = build_report(
        args.model,
        Path(args.out),
        n=args.n,
        seeds=args.seeds,
        cfg_values=args.cfg_values,
        top_k_values=args.top_k_values,
        classifier=classifier_path(args.classifier),
        data=args.data,
        extra_settings=dict(parse_setting(t) for t in args.setting or []),
    )
    print(f"wrote {path}")
