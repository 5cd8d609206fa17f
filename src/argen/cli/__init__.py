"""`argen` command line: train-tokenizer, tokenize, train, train-classifier, sample, edit, eval,
eval-tokenizer, bench, report. One module per command group; this one builds the parser and turns every error
a user can cause into one line."""

from __future__ import annotations

import argparse
import logging
import pickle
import sys

import torch
from safetensors import SafetensorError

from argen.cli.common import (
    DTYPES,
    MAX_IMAGES,
    add_compile_arg,
    add_sampler_args,
    check_device,
    image_file,
    image_or_npz_file,
    model_help,
    nonnegative_int,
    output_file,
    positive_int,
    run_folder,
)
from argen.cli.generate import cmd_edit, cmd_sample
from argen.cli.measure import cmd_bench, cmd_eval, cmd_eval_tokenizer, cmd_report
from argen.cli.serve import add_serve_parser
from argen.cli.train import (
    add_train_args,
    cmd_tokenize,
    cmd_train,
    cmd_train_classifier,
    cmd_train_tokenizer,
    generator_preset_help,
    generator_presets,
    tokenizer_presets,
)
from argen.errors import ArgenError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to every option's help; an option whose default is None or False says what
    happens without it in its own help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too: 'argen sample: error: argument -n: ...'."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="argen", description="Autoregressive image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    device = "cpu, cuda, cuda:1, mps ..."

    p = sub.add_parser("sample", help="generate images (default: the shipped MNIST model, every class)")
    p.add_argument("--model", default="default", help=model_help())
    p.add_argument("--labels", default=None, help="comma-separated class ids or names (default: every class)")
    p.add_argument(
        "-n",
        type=positive_int,
        default=8,
        help=f"images per label: -n 8 over 10 classes makes 80 (at most {MAX_IMAGES:,} in all)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    add_sampler_args(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images generated at once")
    p.add_argument(
        "--out",
        type=image_or_npz_file,
        default="samples.png",
        help=".png (or another image format) grid, a row per label; or .npz (images, labels)",
    )
    p.add_argument("--device", default=None, help=f"{device} (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (logits stay fp32)")
    add_compile_arg(p)
    p.add_argument(
        "--classifier", default=None, help="'default' or a classifier folder: report class accuracy (default: off)"
    )
    p.add_argument(
        "--progressive",
        action="store_true",
        help="write the image after every step, a row per image: coarse to fine for next-scale, a partial "
        "canvas for the other orders",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="zero-shot in-/out-painting and class-conditional editing")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file to edit")
    source.add_argument("--digit", type=nonnegative_int, help="edit the N-th digit of mnist:test (0 = the first)")
    p.add_argument("--model", default="next-scale", help=model_help())
    p.add_argument("--box", required=True, help="x0,y0,x1,y1: the pixel box to regenerate (end exclusive)")
    p.add_argument("--outpaint", action="store_true", help="regenerate everything outside the box instead")
    p.add_argument("--label", default=None, help="class of the result (default: the digit's own class)")
    p.add_argument("-n", type=positive_int, default=4, help="variants")
    p.add_argument("--seed", type=int, default=0, help="variant i uses seed + i")
    p.add_argument("--out", type=image_file, default="edit.png", help="image strip: source | kept region | variants")
    p.add_argument("--device", default=None, help=f"{device} (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (logits stay fp32)")
    add_sampler_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("train-tokenizer", help="train a tokenizer on images (VQ, multi-scale VQ or KL)")
    p.add_argument("--data", default="mnist", help="mnist, fashion-mnist or an image folder root/<class>/<image>")
    p.add_argument(
        "--preset",
        default="mnist-small",
        choices=sorted(tokenizer_presets()),
        help="tokenizer architecture and size; change single fields with --set",
    )
    p.add_argument(
        "--restart-every", type=nonnegative_int, default=50, help="VQ: steps between dead-code restarts (0: never)"
    )
    add_train_args(p, steps=700, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="pre-tokenize a dataset into memory-mapped token shards")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer folder (e.g. RUN/final), or a pipeline's: a name or folder"
    )
    p.add_argument("--data", default="mnist", help="mnist, fashion-mnist (optionally :train/:test) or a folder")
    p.add_argument("--out", type=run_folder, required=True, help="folder for the token shards")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images tokenized at once")
    p.add_argument("--hflip", action="store_true", help="also store mirrored images (not for digits)")
    p.add_argument(
        "--normalize",
        choices=["global", "channel"],
        default="global",
        help="latents (KL tokenizers): one scale factor for every value (MAR), or each channel standardised to mean "
        "0 and std 1 (its own shift and scale)",
    )
    p.add_argument("--device", default="cpu", help=device)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train a generator of any order (its --preset names it) on token shards")
    p.add_argument("--tokens", required=True, help="token shards folder from `argen tokenize`")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder, or a pipeline's (a name or folder): enables previews and writes RUN/pipeline "
        "(default: none; next-scale needs it)",
    )
    p.add_argument(
        "--preset",
        default="mnist-small",
        choices=sorted(generator_presets()),
        help=generator_preset_help(),
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="GENERATOR",
        help="fine-tune: start from this generator folder's weights (a run's final/, a pipeline's generator/) "
        "instead of a fresh initialisation; its config replaces the preset's, --set still applies "
        "(e.g. dropout); it must be of the preset's order and fit the shards (default: none)",
    )
    p.add_argument(
        "--reinit",
        action="append",
        default=[],
        metavar="MODULE",
        help="with --init: this module's parameters (a name prefix such as diffloss or output) start fresh instead "
        "of from --init, and a --set may change their shape (e.g. --reinit diffloss --set head_width=256: a wider "
        "MAR head on a trained transformer); repeatable",
    )
    add_train_args(p, steps=3000, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train the small image classifier used to judge samples")
    p.add_argument("--data", default="mnist:train", help="training images: a built-in split or a folder")
    p.add_argument("--eval-data", default="mnist:test", help="held-out images for the reported accuracy")
    p.add_argument("--image-size", type=positive_int, default=28, help="side the images are resized to")
    p.add_argument("--channels", type=positive_int, default=1, help="1 (grayscale) or 3 (RGB)")
    add_train_args(p, steps=600, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="sample quality: FD, KID, precision/recall, class accuracy, NLL")
    p.add_argument("--model", default="default", help=model_help())
    p.add_argument("--data", default="mnist", help="built-in (its test split is the reference) or a folder")
    p.add_argument("-n", "--n", type=positive_int, default=1000, help="samples per seed = reference set size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one sample set per seed")
    p.add_argument(
        "--features", choices=["classifier", "inception"], default="classifier", help="feature space of FD/KID"
    )
    p.add_argument(
        "--inception-weights", default=None, help="pt_inception-2015-12-05 weights file (default: download)"
    )
    p.add_argument("--classifier", default="default", help="'default' or a classifier folder")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images generated at once")
    p.add_argument(
        "--unguided",
        action="store_true",
        help="also evaluate without guidance (cfg 1, guide 1) and show both columns",
    )
    p.add_argument("--json", type=output_file, default=None, help="also write the report as JSON (default: no)")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="FIELD=V1,V2,...",
        help="evaluate every combination of these sampler values (repeatable) and print the FD-vs-accuracy frontier "
        "(default: the one sampler setting)",
    )
    p.add_argument(
        "--plot", type=output_file, default=None, help="with --sweep: write the frontier as SVG (default: no)"
    )
    p.add_argument(
        "--npz",
        type=output_file,
        default=None,
        help="also export samples for the ADM evaluator (arr_0, uint8 NHWC) (default: no)",
    )
    p.add_argument("--device", default=None, help=f"{device} (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (logits stay fp32)")
    add_compile_arg(p)
    add_sampler_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-tokenizer", help="reconstruction MSE/PSNR, codebook usage and perplexity")
    p.add_argument("--tokenizer", default="default", help="tokenizer folder, or a pipeline name/folder")
    p.add_argument("--data", default="mnist:test", help="images to reconstruct: a built-in split or a folder")
    p.add_argument(
        "--classifier",
        default="default",
        help="features of the reconstruction FD (the generators' anchor, beside the real-data floor): 'default' "
        "(the MNIST classifier), a classifier folder, or 'none' to skip it",
    )
    p.add_argument("-n", "--n", type=int, default=1000, help="reference set size of the reconstruction FD")
    p.set_defaults(func=cmd_eval_tokenizer)

    p = sub.add_parser("bench", help="sampling speed (NFE, s/image, memory, FLOP/s) and training throughput")
    p.add_argument("--model", default="default", help=model_help())
    p.add_argument(
        "--setting",
        action="append",
        metavar="NAME:FIELD=V,...",
        help="a sampler setting to compare (repeatable; the first is the baseline of the ratios; "
        "default: the model's own settings)",
    )
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 64], help="batch sizes to time")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per setting and batch size")
    p.add_argument(
        "--threads", type=positive_int, default=max(1, torch.get_num_threads()), help="CPU threads for torch"
    )
    p.add_argument("--train", action="store_true", help="also measure training tokens/s")
    p.add_argument("--json", type=output_file, default=None, help="also write the figures as JSON (default: no)")
    p.add_argument("--device", default=None, help=f"{device} (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (logits stay fp32)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="HTML page: sample grids, metric table, speed-vs-quality plot")
    p.add_argument("--model", default="default", help=model_help())
    p.add_argument("--out", type=output_file, default="report.html", help="the HTML page to write")
    p.add_argument("--data", default="mnist", help="built-in (its test split is the reference) or a folder")
    p.add_argument("-n", "--n", type=positive_int, default=500, help="samples per seed and setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one sample set per seed")
    p.add_argument("--cfg-values", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="guidance scales to plot")
    p.add_argument("--top-k-values", type=int, nargs="+", default=[0, 20], help="top-k values to plot (0 = all)")
    p.add_argument(
        "--setting",
        action="append",
        metavar="NAME:FIELD=V,...",
        help="more sampler settings to place on the plot, e.g. sjd:speculative=sjd (repeatable; default: none)",
    )
    p.add_argument("--classifier", default="default", help="'default' or a classifier folder")
    p.set_defaults(func=cmd_report)

    add_serve_parser(sub)
    return parser


def user_error(e: BaseException) -> bool:
    """Whether `e` is a mistake the user can fix (shown as one line), rather than a bug in argen."""
    refused_pickle = isinstance(e, RuntimeError) and "weights_only" in str(e)
    user = (ArgenError, OSError, ValueError, TypeError, ImportError, pickle.UnpicklingError, SafetensorError)
    return refused_pickle or isinstance(e, (*user, torch.OutOfMemoryError))


def one_line(e: BaseException) -> str:
    """An error's message on one line, without torch's advice to unpickle with weights_only=False."""
    text = str(e) or type(e).__name__
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        _, _, reason = text.partition("WeightsUnpickler error:")
        reason = reason.strip().splitlines()[0] if reason.strip() else "not a plain tensor file"
        return f"refused to unpickle a file that is not plain weights ({reason}); argen never runs code from a file"
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory ({text.splitlines()[0]}); lower --batch-size or -n"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"argen {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not user_error(e):
            raise
        print(f"argen {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
