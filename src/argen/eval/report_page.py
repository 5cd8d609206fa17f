"""Build the `argen report` page for one pipeline: run the evaluation and the speed benchmark over a grid of
sampler settings and lay the results out with `argen.eval.report`."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from argen.data.images import grid
from argen.eval.evaluate import evaluate, reference_sets
from argen.eval.features import ClassifierFeatures
from argen.eval.report import Point, png_data_uri, render_page, scatter_svg, table_html
from argen.eval.speed import bench_sampling
from argen.pipeline import ARPipeline
from argen.pretrained import atomic_write, load_pretrained

log = logging.getLogger(__name__)


def setting_name(sampler: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sampler.items()) or "default"


# Every string below that comes from outside argen (the model path, class names taken from folder names, setting
# names) is escaped: a folder named `<img src=x onerror=...>` must show as text, not run in the page.
def samples_section(
    model: str, sampler: dict, class_names: list[str], num_images: int, picture: Image.Image
) -> tuple[str, str]:
    """The sample grid, one row per class, with what produced it."""
    classes = html.escape(", ".join(class_names))
    return (
        "Samples",
        f"<p>{html.escape(model)}, default sampler {html.escape(str(sampler))}; one row per class "
        f"({classes}), seeds 0..{num_images - 1}.</p>"
        f"<figure><img alt='sample grid' src='{png_data_uri(picture, 3)}'></figure>",
    )


def metrics_section(
    n: int, seeds: list[int], feature_extractor: str, metric_rows: list[tuple[str, str]]
) -> tuple[str, str]:
    """The default sampler's metrics, with the protocol that produced them."""
    return (
        "Metrics (default sampler)",
        f"<p>N = {n} class-balanced samples per seed against {n} held-out real images; seeds {seeds}; "
        f"features: {html.escape(feature_extractor)}. The real-vs-real floor compares {n} training-split images "
        "with the same reference set: an FD near it is as good as this N can tell.</p>"
        + table_html(["metric", "value"], [list(r) for r in metric_rows]),
    )


def speed_section(speed_batch: int, points: list[Point], rows: list[list]) -> tuple[str, str]:
    """Speed against quality over the sampler settings: the plot and its table."""
    return (
        "Speed vs quality",
        f"<p>x: seconds per image at batch {speed_batch} (median of 3, generation + decode); "
        "y: FD (mean ± std over seeds). Lower-left is better.</p>"
        + scatter_svg(points, f"seconds / image (batch {speed_batch})", "Fréchet distance")
        + table_html(["setting", "NFE", "s/image", "FD", "FD floor", "class accuracy", "precision", "recall"], rows),
    )


def build_report(
    model: str,
    out: Path,
    n: int,
    seeds: list[int],
    cfg_values: list[float],
    top_k_values: list[int],
    classifier: Path,
    data: str = "mnist",
    speed_batch: int = 8,
    extra_settings: dict[str, dict] | None = None,
) -> Path:
    """A grid of guidance scales x top-k values, plus `extra_settings` (name -> sampler fields, e.g.
    {"sjd": {"speculative": "sjd"}}) on the speed-vs-quality plot."""
    pipe = ARPipeline.from_pretrained(model)
    tc = pipe.tokenizer.config
    reference, rest = reference_sets(data, n, tc.image_size, tc.image_channels)
    features = ClassifierFeatures(load_pretrained(classifier))
    settings = {setting_name(s): s for s in ({"cfg_scale": c, "top_k": k} for c in cfg_values for k in top_k_values)}
    settings.update(extra_settings or {})

    reports = {}
    for name, sampler in tqdm(settings.items(), desc="evaluating settings", unit="setting"):
        reports[name] = evaluate(pipe, reference, rest, features, seeds, features, **sampler)
    runs = {name: (pipe, sampler) for name, sampler in settings.items()}
    speed = {r.setting: r for r in bench_sampling(runs, [speed_batch], repeats=3)}

    rows, points = [], []
    for name, rep in reports.items():
        s = speed[name]
        rows.append(
            [
                name,
                s.nfe,
                f"{s.seconds_per_image:.4f}",
                str(rep.fd),
                f"{rep.fd_real_floor:.3g}",
                str(rep.class_accuracy),
                str(rep.precision),
                str(rep.recall),
            ]
        )
        points.append(Point(name, s.seconds_per_image, rep.fd.mean, rep.fd.std))

    default = evaluate(pipe, reference, rest, features, seeds, features)
    labels = torch.arange(pipe.generator.num_classes).repeat_interleave(10)
    samples = pipe(labels, seed=0, output_type="pt").images
    picture = grid(samples, rows=pipe.generator.num_classes)
    sections = [
        samples_section(model, pipe.sampler.flat(), pipe.class_names, len(labels), picture),
        metrics_section(n, seeds, default.feature_extractor, default.rows()),
        speed_section(speed_batch, points, rows),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_page(f"argen report: {model}", sections)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page))
    return out
