"""Helpers the command groups share: argument types, checks before work, sampler options, setting strings,
tables."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from argen.errors import ConfigError

log = logging.getLogger(__name__)

# The most images one command may ask for (labels x -n): enough for any FID set, small enough that a typo
# (-n 1000000000) fails at once instead of allocating for minutes. Run several commands with other seeds for more.
MAX_IMAGES = 100_000


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def run_folder(text: str) -> str:
    """argparse type: a folder to write into (new or existing), not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a folder (new, or a previous run's)")
    return text


def output_file(text: str) -> str:
    """argparse type: a file to write, whose folder can be made; not an existing folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is a file, not a folder")
    return text


def image_file(text: str) -> str:
    """argparse type: an output file in a format Pillow writes (.png, .jpg, .webp, ...)."""
    from PIL import Image

    suffix = Path(text).suffix.lower()
    Image.init()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"unknown image extension {suffix or '(none)'!r} in {text}: use .png (or .jpg, .webp, ...)"
        )
    return output_file(text)


def image_or_npz_file(text: str) -> str:
    """argparse type: `argen sample`'s output, an image grid or an .npz array file."""
    if Path(text).suffix.lower() == ".npz":
        return output_file(text)
    try:
        return image_file(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} or .npz") from None


# `--dtype` of the commands that run a model: the dtype its weights are cast to.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(name: str) -> None:
    """`--device`: refuse a name torch does not know, or an accelerator this machine lacks, before any work."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def check_image_count(num_labels: int, per_label: int, what: str = "per label") -> int:
    """The total a command asks for (labels x -n), refused above MAX_IMAGES."""
    total = num_labels * per_label
    if total > MAX_IMAGES:
        raise ConfigError(
            f"-n {per_label} {what} x {num_labels} label(s) asks for {total:,} images; one command makes at most "
            f"{MAX_IMAGES:,} (lower -n, or run several commands with different --seed)"
        )
    return total


def parse_overrides(items: list[str], option: str = "--set") -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# The sampler options every sampling command has: argparse dest -> (flag, SamplerConfig field).
SAMPLER_OPTIONS = {
    "cfg": ("--cfg", "cfg_scale"),
    "guide": ("--guide", "guide_scale"),
    "top_k": ("--top-k", "top_k"),
    "top_p": ("--top-p", "top_p"),
    "temperature": ("--temperature", "temperature"),
}


def _check_sampler(fields: dict, option: str) -> None:
    from argen.sampling.config import SamplerConfig

    try:
        SamplerConfig.from_flat(fields)  # bad values fail before any work (unknown ones when the model is known)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{option}: {e}") from e


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The sampler fields the command line sets; a bad value is reported under the option that gave it."""
    options = {}
    for dest, (flag, field) in SAMPLER_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            _check_sampler({field: value}, f"{flag} {value}")
            options[field] = value
    overrides = {**options, **parse_overrides(args.set or [])}
    _check_sampler(overrides, "--set")
    return overrides


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the generator's blocks and the tokenizer's decoder (for CUDA; slower on CPU)",
    )


def compile_if_asked(pipe, args: argparse.Namespace) -> None:
    """`--compile`: compile the pipeline in place, saying so on CPU, where it measured slower than eager."""
    if args.compile:
        if pipe.device.type == "cpu":
            log.warning("--compile on CPU: measured slower than eager sampling here, and the first batch compiles")
        pipe.compile()


def check_for_model(pipe, fields: dict, option: str = "--set") -> None:
    """Sampler fields against the loaded model's order (its own options, the accelerations it supports), so a
    typo fails before any sampling."""
    try:
        pipe.config(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{option}: {e}") from e


def shipped_models() -> dict[str, str]:
    """Shipped pipeline names (aliases included) -> the folder each names."""
    from argen.pipeline import SHIPPED

    return dict(SHIPPED)


def shipped_sampler(name: str) -> dict:
    """The sampler defaults in a shipped pipeline's pipeline.json."""
    from argen.pipeline import PIPELINE_NAME, resolve

    return json.loads((resolve(name) / PIPELINE_NAME).read_text()).get("sampler", {})


def model_help() -> str:
    names = shipped_models()
    listed = ", ".join(f"{k} (= {v})" if k != v else k for k, v in names.items())
    return f"a shipped model: {listed}; or a pipeline folder (RUN/pipeline from argen train)"


def guidance_defaults() -> str:
    """Each shipped model's guidance, as its pipeline.json sets it: 'raster-mnist 2.0 (constant), ...'."""
    parts = []
    for folder in sorted(set(shipped_models().values())):
        s = shipped_sampler(folder)
        parts.append(f"{folder} {s.get('cfg_scale', 1.0)} ({s.get('cfg_schedule', 'constant')} schedule)")
    return ", ".join(parts)


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    own = "(default: the model's own, from its pipeline.json)"
    p.add_argument(
        "--cfg",
        type=finite_float,
        default=None,
        help=f"classifier-free guidance scale, 1 = none; larger follows the label more closely "
        f"(default: the model's own: {guidance_defaults()})",
    )
    p.add_argument(
        "--guide",
        type=finite_float,
        default=None,
        help="autoguidance scale against the pipeline's guide model (a weaker model of the same order; on the "
        f"schedule of --cfg), 1 = none {own}",
    )
    p.add_argument(
        "--top-k", type=int, default=None, help=f"sample among the k most likely tokens only; 0 = all {own}"
    )
    p.add_argument(
        "--top-p",
        type=finite_float,
        default=None,
        help=f"sample among the most likely tokens holding this much probability, in (0, 1]; 1 = all {own}",
    )
    p.add_argument(
        "--temperature",
        type=finite_float,
        default=None,
        help=f"divide the logits by this (> 0): below 1 sharper, above 1 more varied {own}",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=V",
        help="any sampler field, e.g. --set speculative=mc-sjd --set window=16 (repeatable; default: none)",
    )


def load_tokenizer(name: str):
    """A tokenizer checkpoint folder as given, or the tokenizer of a pipeline (a shipped name or a folder): every
    command that takes --tokenizer reads it the same way, and refuses a folder holding something else."""
    from argen.pipeline import resolve
    from argen.tokenizers.registry import load

    path = Path(name)
    return load(path if (path / "config.json").is_file() else resolve(name) / "tokenizer")


def classifier_path(name: str) -> Path:
    from argen.eval.features import DEFAULT_CLASSIFIER

    return DEFAULT_CLASSIFIER if name == "default" else Path(name)


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def parse_setting(text: str) -> tuple[str, dict]:
    """'name:cfg_scale=3,top_k=50' -> ('name', {...}); 'plain' or 'plain:' -> no overrides."""
    name, _, body = text.partition(":")
    fields = parse_overrides([kv for kv in body.split(",") if kv], "--setting") if body else {}
    _check_sampler(fields, f"--setting {text!r}")  # unknown fields fail here, before any timing
    return name, fields
