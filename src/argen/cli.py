"""`argen` command line: train-tokenizer, tokenize, train, train-classifier, sample, eval, eval-tokenizer,
bench, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from argen.pretrained import config_from_dict

log = logging.getLogger("argen")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _model_config(presets: dict, name: str, overrides: list[str]):
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; choose from {sorted(presets)}")
    base = dataclasses.asdict(presets[name])
    try:
        return config_from_dict(type(presets[name]), {**base, **_parse_overrides(overrides)})
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e)) from e


def _add_train_args(p: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    from argen.train.loop import TrainConfig

    d = TrainConfig()
    p.add_argument("--out", required=True, help="run folder: checkpoints, previews, log.jsonl, final/")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch size (all ranks together)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables EMA")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--preview-every", type=int, default=d.preview_every)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the model preset (repeatable)",
    )


def _train_config(args: argparse.Namespace):
    from argen.train.loop import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        seed=args.seed,
        save_every=args.save_every,
        preview_every=args.preview_every,
        num_workers=args.num_workers,
    )


def _tokenizer_presets() -> dict:
    from argen.tokenizers.multiscale import MULTISCALE_PRESETS
    from argen.tokenizers.vq import VQ_PRESETS

    return {**VQ_PRESETS, **MULTISCALE_PRESETS}


def _generator_presets() -> dict:
    from argen.models.next_scale import NEXT_SCALE_PRESETS
    from argen.models.raster import RASTER_PRESETS

    return {**RASTER_PRESETS, **NEXT_SCALE_PRESETS}


def _build(config):
    """A config dataclass -> the component it configures."""
    from argen.models.next_scale import NextScaleConfig, NextScaleTransformer
    from argen.models.raster import RasterConfig, RasterTransformer
    from argen.tokenizers.multiscale import MultiScaleVQ, MultiScaleVQConfig
    from argen.tokenizers.vq import VQConfig, VQTokenizer

    classes = {
        VQConfig: VQTokenizer,
        MultiScaleVQConfig: MultiScaleVQ,
        RasterConfig: RasterTransformer,
        NextScaleConfig: NextScaleTransformer,
    }
    return classes[type(config)](config)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.train.loop import train
    from argen.train.tasks import TokenizerTask

    config = _model_config(_tokenizer_presets(), args.preset, args.overrides)
    dataset = load_dataset(args.data, config.image_size, config.image_channels)
    torch.manual_seed(args.seed)
    model = _build(config)
    preview = torch.stack([dataset[int(i)][0] for i in np.linspace(0, len(dataset) - 1, min(16, len(dataset)))])
    result = train(
        TokenizerTask(model, preview, args.restart_every),
        dataset,
        _train_config(args),
        args.out,
        resume=args.resume,
        device=args.device,
    )
    if result.output:
        print(f"tokenizer saved to {result.output} (loss {result.final_loss:.4f}, {result.seconds:.0f} s)")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.data.shards import write_shards
    from argen.pretrained import load_pretrained

    tokenizer = load_pretrained(args.tokenizer).to(args.device)
    dataset = load_dataset(args.data, tokenizer.config.image_size, tokenizer.config.image_channels)
    out = write_shards(tokenizer, dataset, args.out, batch_size=args.batch_size, hflip=args.hflip)
    print(f"wrote token shards to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from argen.data.shards import TokenShards
    from argen.models.next_scale import NextScaleConfig
    from argen.pipeline import ARPipeline
    from argen.pretrained import load_pretrained
    from argen.train.loop import train
    from argen.train.tasks import GeneratorTask

    shards = TokenShards(args.tokens)
    presets = _generator_presets()
    if args.preset not in presets:
        raise SystemExit(f"unknown preset {args.preset!r}; choose from {sorted(presets)}")
    tokenizer = load_pretrained(args.tokenizer) if args.tokenizer else None
    overrides = [f"vocab_size={shards.vocab_size}"]
    if shards.class_names:
        overrides.append(f"num_classes={len(shards.class_names)}")
    if isinstance(presets[args.preset], NextScaleConfig):
        if tokenizer is None:
            raise ValueError("a next-scale generator trains through its tokenizer: pass --tokenizer")
        overrides += [f"scales={list(tokenizer.scales)}", f"token_dim={tokenizer.config.z_channels}"]
    else:
        overrides.append(f"grid_size={int(round(shards.seq_len**0.5))}")
    config = _model_config(presets, args.preset, overrides + args.overrides)
    torch.manual_seed(args.seed)
    model = _build(config)
    if hasattr(model, "bind"):
        model.bind(tokenizer)
    task = GeneratorTask(model, decode=tokenizer.decode if tokenizer is not None else None)
    result = train(task, shards, _train_config(args), args.out, resume=args.resume, device=args.device)
    if result.output:
        print(f"generator saved to {result.output} (loss {result.final_loss:.4f}, {result.seconds:.0f} s)")
        if tokenizer is not None:
            pipe = ARPipeline(tokenizer, load_pretrained(result.output), shards.class_names or None)
            if hasattr(model, "bind"):  # VAR's ramp: guidance grows over the scales
                pipe.sampler = dataclasses.replace(pipe.sampler, cfg_schedule="var_ramp")
            print(f"pipeline saved to {pipe.save_pretrained(Path(args.out) / 'pipeline')}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from argen.data.datasets import ArrayDataset, load_dataset
    from argen.eval.classifier import ClassifierConfig, ImageClassifier, accuracy
    from argen.pretrained import load_pretrained
    from argen.train.loop import train
    from argen.train.tasks import ClassifierTask

    config = ClassifierConfig(image_size=args.image_size, image_channels=args.channels)
    data = load_dataset(args.data, config.image_size, config.image_channels)
    held = ArrayDataset.of(load_dataset(args.eval_data, config.image_size, config.image_channels))
    config = dataclasses.replace(config, num_classes=len(data.class_names))
    torch.manual_seed(args.seed)
    result = train(
        ClassifierTask(ImageClassifier(config)),
        data,
        _train_config(args),
        args.out,
        resume=args.resume,
        device=args.device,
    )
    if result.output:
        acc = accuracy(load_pretrained(result.output), held.images, held.labels)
        print(
            f"classifier saved to {result.output}: accuracy {acc:.4f} on {len(held)} held-out images "
            f"({args.eval_data})"
        )


def cmd_sample(args: argparse.Namespace) -> None:
    from argen.data.images import grid
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu")
    classes = args.labels.split(",") if args.labels else list(range(pipe.generator.num_classes))
    labels = pipe.label_ids([c.strip() if isinstance(c, str) else c for c in classes]).repeat_interleave(args.n)
    overrides = _sampler_overrides(args)
    if args.progressive:
        frames = list(pipe.progressive(labels, seed=args.seed, **overrides))  # each (N, C, H, W)
        strip = torch.stack(frames, dim=1).flatten(0, 1)  # (N * steps, C, H, W): a row per image
        grid(strip, rows=len(labels)).save(args.out)
        print(f"wrote {len(frames)} previews (coarse to fine) of {len(labels)} images to {args.out}")
        return
    t0 = time.perf_counter()
    out = pipe(labels, seed=args.seed, batch_size=args.batch_size, output_type="pt", progress=True, **overrides)
    seconds = time.perf_counter() - t0
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        from argen.data.images import to_uint8

        np.savez(path, images=to_uint8(out.images), labels=out.labels.numpy().astype(np.int64))
    else:
        grid(out.images, rows=len(classes)).save(path)
    print(
        f"wrote {len(labels)} images ({len(classes)} classes x {args.n}) to {path} "
        f"in {seconds:.1f} s ({seconds / len(labels):.3f} s/image)"
    )
    if args.classifier:
        from argen.eval.classifier import accuracy
        from argen.pretrained import load_pretrained

        clf_path = (
            Path(__file__).parent / "assets" / "mnist-classifier" if args.classifier == "default" else args.classifier
        )
        acc = accuracy(load_pretrained(clf_path), out.images, out.labels)
        print(f"class accuracy under {clf_path}: {acc:.4f}")


def _sampler_overrides(args: argparse.Namespace) -> dict:
    values = {"cfg_scale": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    overrides = {**{k: v for k, v in values.items() if v is not None}, **_parse_overrides(args.set or [])}
    from argen.sampling.decode import SamplerConfig

    try:
        config_from_dict(SamplerConfig, overrides)  # unknown fields and bad values fail before any work
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--set: {e}") from e
    return overrides


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=V",
        help="any sampler field, e.g. --set speculative=mc-sjd --set window=16 (repeatable)",
    )


def _classifier_path(name: str) -> Path:
    from argen.eval.features import DEFAULT_CLASSIFIER

    return DEFAULT_CLASSIFIER if name == "default" else Path(name)


def _print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def cmd_eval(args: argparse.Namespace) -> None:
    from argen.eval.evaluate import evaluate, reference_sets, sample_uint8
    from argen.eval.features import ClassifierFeatures, inception_features
    from argen.pipeline import ARPipeline
    from argen.pretrained import atomic_write, load_pretrained

    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu")
    tc = pipe.tokenizer.config
    reference, rest = reference_sets(args.data, args.n, tc.image_size, tc.image_channels)
    classifier = ClassifierFeatures(load_pretrained(_classifier_path(args.classifier))) if args.classifier else None
    if args.features == "inception":
        try:
            extractor = inception_features(args.inception_weights)
        except RuntimeError as e:
            print(f"skipping Inception FID: {e}", file=sys.stderr)
            return
    else:
        if classifier is None:
            raise ValueError("--features classifier needs --classifier")
        extractor = classifier
    sampler = _sampler_overrides(args)
    report = evaluate(pipe, reference, rest, extractor, args.seeds, classifier, batch_size=args.batch_size, **sampler)
    print(f"model {args.model}, sampler {report.sampler}")
    print(
        f"N = {report.num_samples} generated (class-balanced) vs {report.num_samples} held-out real images, "
        f"seeds {report.seeds} (mean ± std over seeds)"
    )
    _print_table(["metric", "value"], [list(r) for r in report.rows()])
    if args.json:
        atomic_write(Path(args.json), lambda t: Path(t).write_text(json.dumps(dataclasses.asdict(report), indent=2)))
    if args.npz:
        images, labels = sample_uint8(pipe, args.n, args.seeds[0], args.batch_size, **sampler)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # the ADM evaluator expects RGB
        np.savez(args.npz, arr_0=images, labels=labels.numpy().astype(np.int64))
        print(f"wrote {len(images)} samples to {args.npz} (arr_0: uint8 NHWC, the ADM evaluator layout)")


def cmd_eval_tokenizer(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.eval.tokenizer import evaluate_tokenizer
    from argen.pipeline import resolve
    from argen.pretrained import load_pretrained

    path = Path(args.tokenizer)
    folder = path if (path / "config.json").is_file() else resolve(args.tokenizer) / "tokenizer"
    tokenizer = load_pretrained(folder)
    data = load_dataset(args.data, tokenizer.config.image_size, tokenizer.config.image_channels)
    r = evaluate_tokenizer(tokenizer, data)
    _print_table(
        ["metric", "value"],
        [
            ["images", r.num_images],
            ["MSE (pixels in [0, 1])", f"{r.mse:.5f}"],
            ["PSNR (dB)", f"{r.psnr:.2f}"],
            ["codebook usage", f"{r.codebook_usage:.3f} of {tokenizer.vocab_size}"],
            ["codebook perplexity", f"{r.codebook_perplexity:.1f}"],
        ],
    )


def _parse_setting(text: str) -> tuple[str, dict]:
    """'name:cfg_scale=3,top_k=50' -> ('name', {...}); 'plain' or 'plain:' -> no overrides."""
    name, _, body = text.partition(":")
    fields = _parse_overrides([kv for kv in body.split(",") if kv]) if body else {}
    from argen.sampling.decode import SamplerConfig

    config_from_dict(SamplerConfig, fields)  # unknown fields fail here, before any timing
    return name, fields


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from argen.eval.speed import bench_sampling, bench_training, matmul_peak_flops
    from argen.pipeline import ARPipeline
    from argen.pretrained import atomic_write

    torch.set_num_threads(args.threads)
    pipe = ARPipeline.from_pretrained(args.model, device=args.device or "cpu")
    settings = dict(_parse_setting(s) for s in (args.setting or ["default"]))
    peak = matmul_peak_flops()
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
    _print_table([*header, "accepted"], rows)
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
        _print_table(["setting", "batch", "NFE ratio", "time ratio"], ratio_rows)
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
        classifier=_classifier_path(args.classifier),
        data=args.data,
        extra_settings=dict(_parse_setting(t) for t in args.setting or []),
    )
    print(f"wrote {path}")


def cmd_edit(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.data.images import grid, load_image, to_tensor
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained(args.model)
    size, channels = pipe.tokenizer.config.image_size, pipe.tokenizer.config.image_channels
    if args.digit is not None:
        test = load_dataset("mnist:test", size, channels)
        image, own = test[args.digit]
        label = args.label if args.label is not None else str(int(own))
    else:
        image = to_tensor(load_image(args.image, channels, size))
        if args.label is None:
            raise ValueError("--label is required with --image")
        label = args.label
    try:
        x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
    except ValueError as e:
        raise ValueError(f"--box must be x0,y0,x1,y1 integers, got {args.box!r}") from e
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"--box {args.box} must lie inside the {size}x{size} image with x0 < x1 and y0 < y1")
    regenerate = torch.zeros(1, 1, size, size, dtype=torch.bool)
    regenerate[..., y0:y1, x0:x1] = True
    keep = ~regenerate if not args.outpaint else regenerate
    images = image[None].expand(args.n, -1, -1, -1)
    out = pipe.edit(
        images,
        keep.expand(args.n, -1, -1, -1),
        [label] * args.n,
        seed=args.seed,
        output_type="pt",
        **_sampler_overrides(args),
    )
    masked = torch.where(keep[0], image, torch.full_like(image, -0.3))  # the hole shown in grey
    grid(torch.cat([image[None], masked[None], out.images]), rows=1).save(args.out)
    print(f"wrote source, kept region and {args.n} edits (class {label}) to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argen", description="Autoregressive image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images (default: the shipped MNIST model, every class)")
    p.add_argument("--model", default="default", help="shipped name (default, raster) or a pipeline folder")
    p.add_argument("--labels", default=None, help="comma-separated class ids or names (default: every class)")
    p.add_argument("-n", type=int, default=8, help="images per label")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    _add_sampler_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="samples.png", help=".png grid (a row per label) or .npz (images, labels)")
    p.add_argument("--device", default=None)
    p.add_argument("--classifier", default=None, help="'default' or a classifier folder: report class accuracy")
    p.add_argument(
        "--progressive",
        action="store_true",
        help="next-scale models: write the image after every scale, a row per image",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="zero-shot in-/out-painting and class-conditional editing")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file to edit")
    source.add_argument("--digit", type=int, help="edit the N-th digit of mnist:test")
    p.add_argument("--model", default="next-scale")
    p.add_argument("--box", required=True, help="x0,y0,x1,y1: the pixel box to regenerate (end exclusive)")
    p.add_argument("--outpaint", action="store_true", help="regenerate everything outside the box instead")
    p.add_argument("--label", default=None, help="class of the result (default: the digit's own class)")
    p.add_argument("-n", type=int, default=4, help="variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="edit.png", help="PNG strip: source | kept region | variants")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer on images")
    p.add_argument("--data", default="mnist", help="mnist, fashion-mnist or an image folder root/<class>/<image>")
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--restart-every", type=int, default=50, help="steps between dead-code restarts (0: never)")
    _add_train_args(p, steps=700, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="pre-tokenize a dataset into memory-mapped token shards")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. RUN/final)")
    p.add_argument("--data", default="mnist")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hflip", action="store_true", help="also store mirrored images (not for digits)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train a raster generator on token shards")
    p.add_argument("--tokens", required=True, help="token shards folder from `argen tokenize`")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder: enables previews and writes RUN/pipeline")
    p.add_argument("--preset", default="mnist-small")
    _add_train_args(p, steps=3000, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train the small image classifier used to judge samples")
    p.add_argument("--data", default="mnist:train")
    p.add_argument("--eval-data", default="mnist:test", help="held-out images for the reported accuracy")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    _add_train_args(p, steps=600, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="sample quality: FD, KID, precision/recall, class accuracy, NLL")
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="mnist", help="built-in (its test split is the reference) or a folder")
    p.add_argument("-n", "--n", type=int, default=1000, help="samples per seed = reference set size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--features", choices=["classifier", "inception"], default="classifier")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 weights file")
    p.add_argument("--classifier", default="default", help="'default' or a classifier folder")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the report as JSON")
    p.add_argument("--npz", default=None, help="also export samples for the ADM evaluator (arr_0, uint8 NHWC)")
    p.add_argument("--device", default=None)
    _add_sampler_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-tokenizer", help="reconstruction MSE/PSNR, codebook usage and perplexity")
    p.add_argument("--tokenizer", default="default", help="tokenizer folder, or a pipeline name/folder")
    p.add_argument("--data", default="mnist:test")
    p.set_defaults(func=cmd_eval_tokenizer)

    p = sub.add_parser("bench", help="sampling speed (NFE, s/image, memory, FLOP/s) and training throughput")
    p.add_argument("--model", default="default")
    p.add_argument(
        "--setting",
        action="append",
        metavar="NAME:FIELD=V,...",
        help="a sampler setting to compare (repeatable; the first is the baseline of the ratios)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--train", action="store_true", help="also measure training tokens/s")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="HTML page: sample grids, metric table, speed-vs-quality plot")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="report.html")
    p.add_argument("--data", default="mnist")
    p.add_argument("-n", "--n", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cfg-values", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--top-k-values", type=int, nargs="+", default=[0, 20])
    p.add_argument(
        "--setting",
        action="append",
        metavar="NAME:FIELD=V,...",
        help="more sampler settings to place on the plot, e.g. sjd:speculative=sjd (repeatable)",
    )
    p.add_argument("--classifier", default="default")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        print(f"argen {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
