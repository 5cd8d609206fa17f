import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from PIL import Image

from argen.eval.report import Point, png_data_uri, render_page, scatter_svg, table_html


def test_scatter_plot_places_points_by_value():
    svg = scatter_svg([Point("slow", 0.0625, 10.0, 1.0), Point("fast", 0.0543, 20.0)], "s/image", "FD")
    circles = [(float(x), float(y)) for x, y in re.findall(r'class="point" cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(circles) == 2
    (x_slow, y_slow), (x_fast, y_fast) = circles
    assert x_fast < x_slow  # smaller time is further left
    assert y_fast < y_slow  # larger FD is higher up (smaller SVG y)
    assert "s/image" in svg and "FD" in svg and svg.count("<line") > 4
    # every point lies inside the plotting area
    width = float(re.search(r'width="(\d+)"', svg)[1])
    assert all(70 <= x <= width - 150 and 20 <= y <= 400 - 50 for x, y in circles)


def test_zoomed_scatter_plot_spreads_close_values():
    points = [Point("a", 1.0, 31.0, 0.5), Point("b", 0.8, 33.5, 2.0), Point("c", 1.9, 36.0)]
    spread, lowest_tick = [], []
    for svg in (scatter_svg(points, "time", "FD"), scatter_svg(points, "time", "FD", y_from_zero=False)):
        ys = [float(y) for y in re.findall(r'class="point" cx="[\d.]+" cy="([\d.]+)"', svg)]
        assert all(20 <= y <= 400 - 50 for y in ys)  # inside the plotting area
        ticks = [float(t) for t in re.findall(r'text-anchor="end">([\d.]+)</text>', svg)]
        assert min(ticks) <= 31.0 - 0.5 and max(ticks) >= 36.0  # the axis covers every error bar
        spread.append(max(ys) - min(ys))
        lowest_tick.append(min(ticks))
    assert lowest_tick[0] == 0 and lowest_tick[1] > 20
    assert spread[1] > 4 * spread[0]


def test_page_is_self_contained_and_escapes_text():
    image = Image.new("L", (4, 4), 128)
    page = render_page(
        "t <1>", [("Samples", f"<img src='{png_data_uri(image)}'>"), ("Table", table_html(["a", "b"], [["<x>", "1"]]))]
    )
    assert page.startswith("<!DOCTYPE html>") and "t &lt;1&gt;" in page and "&lt;x&gt;" in page
    assert "data:image/png;base64," in page and "http" not in page.replace("http://www.w3.org", "")


def test_report_page_escapes_class_names_model_and_setting_names(tmp_path, monkeypatch):
    """Every string that reaches the page from outside (folder-derived class names, the --model path, setting
    names) shows as text: the page holds no tag the user did not get from argen."""
    import argen.eval.report_page as report_page
    from argen.eval.evaluate import EvalReport, MeanStd

    hostile_class, hostile_model, hostile_setting = "<img src=x onerror=alert(1)>", "m\"'<script>x</script>", "<b>s"

    @dataclass
    class Sampler:
        def flat(self) -> dict:
            return {"speculative": "<i>draft</i>"}

    pipe = SimpleNamespace(
        tokenizer=SimpleNamespace(config=SimpleNamespace(image_size=8, image_channels=1)),
        generator=SimpleNamespace(num_classes=2),
        sampler=Sampler(),
        class_names=["ok", hostile_class],
    )
    monkeypatch.setattr(report_page.ARPipeline, "from_pretrained", lambda model: FakePipe(pipe))
    monkeypatch.setattr(report_page, "reference_sets", lambda *a: (None, None))
    monkeypatch.setattr(report_page, "load_pretrained", lambda path: None)
    monkeypatch.setattr(report_page, "ClassifierFeatures", lambda classifier: None)
    score = MeanStd.of([1.0, 2.0])
    report = EvalReport(4, [0], {}, score, 1.0, score, score, score, score, score, 3.0, "<u>features</u>")
    monkeypatch.setattr(report_page, "evaluate", lambda *a, **k: report)
    monkeypatch.setattr(
        report_page,
        "bench_sampling",
        lambda runs, batches, repeats: [SimpleNamespace(setting=s, nfe=3, seconds_per_image=0.1) for s in runs],
    )
    out = report_page.build_report(
        hostile_model, tmp_path / "r.html", 4, [0], [2.0], [0], tmp_path, extra_settings={hostile_setting: {}}
    )
    page = out.read_text()
    tags = set(re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]*)", page))
    argen_tags = "html head meta title style body h1 h2 section p figure img svg rect line text circle table thead"
    assert tags <= set(argen_tags.split()) | {"tbody", "tr", "th", "td"}
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;" in page and "&lt;b&gt;s" in page
    assert page.count("<img") == 1 and "m&quot;&#x27;&lt;script&gt;" in page


class FakePipe:
    """A pipeline that returns blank samples: the page's layout is under test, not the model."""

    def __init__(self, fields: SimpleNamespace):
        self.__dict__.update(vars(fields))

    def __call__(self, labels, seed, output_type):
        return SimpleNamespace(images=torch.zeros(len(labels), 1, 8, 8))
