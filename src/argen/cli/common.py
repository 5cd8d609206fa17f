"""Helpers the command groups share: sampler options, setting strings, tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from argen.pretrained import config_from_dict


def parse_overrides(items: list[str]) -> dict:
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


def sampler_overrides(args: argparse.Namespace) -> dict:
    values = {"cfg_scale": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    overrides = {**{k: v for k, v in values.items() if v is not None}, **parse_overrides(args.set or [])}
    from argen.sampling.decode import SamplerConfig

    try:
        config_from_dict(SamplerConfig, overrides)  # unknown fields and bad values fail before any work
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--set: {e}") from e
    return overrides


def add_sampler_args(p: argparse.ArgumentParser) -> None:
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
    fields = parse_overrides([kv for kv in body.split(",") if kv]) if body else {}
    from argen.sampling.decode import SamplerConfig

    config_from_dict(SamplerConfig, fields)  # unknown fields fail here, before any timing
    return name, fields
