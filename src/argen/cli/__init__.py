"""`argen` command line: train-tokenizer, tokenize, train, train-classifier, sample, edit, eval,
eval-tokenizer, bench, report. One module per command group; this one builds the parser."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from argen.cli.common import add_sampler_args
from argen.cli.generate import cmd_edit, cmd_sample
from argen.cli.measure import cmd_bench, cmd_eval, cmd_eval_tokenizer, cmd_report
from argen.cli.train import add_train_args, cmd_tokenize, cmd_train, cmd_train_classifier, cmd_train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argen", description="Autoregressive image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images (default: the shipped MNIST model, every class)")
    p.add_argument("--model", default="default", help="shipped name (default, raster) or a pipeline folder")
    p.add_argument("--labels", default=None, help="comma-separated class ids or names (default: every class)")
    p.add_argument("-n", type=int, default=8, help="images per label")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    add_sampler_args(p)
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
    add_sampler_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer on images")
    p.add_argument("--data", default="mnist", help="mnist, fashion-mnist or an image folder root/<class>/<image>")
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--restart-every", type=int, default=50, help="steps between dead-code restarts (0: never)")
    add_train_args(p, steps=700, batch_size=64, lr=1e-3)
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
    add_train_args(p, steps=3000, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train the small image classifier used to judge samples")
    p.add_argument("--data", default="mnist:train")
    p.add_argument("--eval-data", default="mnist:test", help="held-out images for the reported accuracy")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    add_train_args(p, steps=600, batch_size=64, lr=1e-3)
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
    add_sampler_args(p)
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
