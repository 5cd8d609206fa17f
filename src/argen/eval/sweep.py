"""`argen eval --sweep`: the quality frontier of one model over sampler settings.

Every combination of the swept fields is judged on the same protocol as a single `argen eval` (one reference set,
one floor, the same seeds), so the points are comparable. The frontier is the set of settings that no other
setting beats on both FD and class accuracy; a shipped pipeline's defaults are picked from it, and the sweep
records the unguided points beside it whenever `cfg_scale` is swept through 1.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from argen.errors import ConfigError
from argen.eval.evaluate import EvalReport, evaluate
from argen.eval.report import Point, scatter_svg


@dataclass
class SweepPoint:
    settings: dict  # the swept fields only; the rest are the pipeline's defaults plus fixed overrides
    report: EvalReport
    on_frontier: bool = False

    @property
    def accuracy(self) -> float:
        acc = self.report.class_accuracy
        return float("nan") if acc is None else acc.mean

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


def parse_axes(specs: list[str]) -> dict[str, list]:
    """['cfg_scale=1,1.5,2', 'top_k=0,50'] -> {'cfg_scale': [1, 1.5, 2], 'top_k': [0, 50]}."""
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, body = spec.partition("=")
        values = [v.strip() for v in body.split(",") if v.strip()]
        if not sep or not name or not values:
            raise ConfigError(f"--sweep expects FIELD=V1,V2,..., got {spec!r}")
        if name in axes:
            raise ConfigError(f"--sweep names {name!r} twice")
        axes[name] = [_value(v) for v in values]
    return axes


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a schedule name such as `linear`


def grid(axes: dict[str, list]) -> list[dict]:
    """Every combination, the first axis varying slowest."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(axes[n] for n in names))]


def mark_frontier(points: list[SweepPoint]) -> list[SweepPoint]:
    """Flag the points that no other point dominates (FD no higher and accuracy no lower, one strictly)."""
    for p in points:
        fd, acc = p.report.fd.mean, p.accuracy
        p.on_frontier = not any(
            q is not p and q.report.fd.mean <= fd and q.accuracy >= acc and (q.report.fd.mean < fd or q.accuracy > acc)
            for q in points
        )
    return points


def sweep(
    pipe, reference, train_split, extractor, seeds: list[int], axes: dict[str, list], progress=None, **kwargs
) -> list[SweepPoint] | None:
    """Evaluate every setting of `axes` (over the fixed sampler fields in `kwargs`); None off the main rank.

    `kwargs` are `evaluate`'s keyword arguments (classifier, batch_size, dist_info) plus fixed sampler fields.
    Each setting is checked against the model before any sampling, so a typo in the last value fails at once.
    """
    settings = grid(axes)
    fixed = {k: v for k, v in kwargs.items() if k not in ("classifier", "batch_size", "dist_info")}
    for s in settings:
        try:
            pipe.config(**fixed, **s)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--sweep {', '.join(f'{k}={v}' for k, v in s.items())}: {e}") from e
    points = []
    for i, s in enumerate(settings):
        if progress is not None:
            progress(i, len(settings), s)
        report = evaluate(pipe, reference, train_split, extractor, seeds, **kwargs, **s)
        if report is not None:
            points.append(SweepPoint(s, report))
    return mark_frontier(points) if points else None


def frontier_svg(points: list[SweepPoint]) -> str:
    """FD (as a multiple of the real floor) against class accuracy; frontier points are starred."""
    return scatter_svg(
        [
            Point(
                ("★ " if p.on_frontier else "") + p.label(),
                100 * p.accuracy,
                p.report.fd_multiple,
                p.report.fd.std / p.report.fd_real_floor,
            )
            for p in points
        ],
        "class accuracy (%)",
        "FD / real-data floor",
        width=760,
        y_from_zero=False,
    )


def rows(points: list[SweepPoint]) -> list[list[str]]:
    """One table row per setting: the setting, FD (x floor), accuracy, recall, near-copies, bar, frontier."""
    out = []
    for p in points:
        r = p.report
        acc = "-" if r.class_accuracy is None else f"{r.class_accuracy.mean:.1%}"
        # a setting can buy FD and accuracy by drawing samples nearer the training images; the frontier does not see it
        copies = "-" if r.near_copies is None else f"{r.near_copies.mean:.1%}"
        copies += " MEMORISING" if r.memorising else ""
        out.append(
            [
                p.label(),
                f"{r.fd} ({r.fd_multiple:.2f}x)",
                acc,
                f"{r.recall.mean:.3f}",
                copies,
                "met" if not r.below_bar() else "below",
                "*" if p.on_frontier else "",
            ]
        )
    return out
