import json

import pytest

from argen.errors import ConfigError
from argen.eval.evaluate import EvalReport, MeanStd, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.sweep import SweepPoint, frontier_svg, grid, mark_frontier, parse_axes, rows, sweep
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained


def test_parse_axes_and_grid():
    axes = parse_axes(["cfg_scale=1,1.5, 2", "cfg_schedule=linear,constant"])
    assert axes == {"cfg_scale": [1, 1.5, 2], "cfg_schedule": ["linear", "constant"]}
    settings = grid(axes)
    assert len(settings) == 6 and settings[0] == {"cfg_scale": 1, "cfg_schedule": "linear"}
    assert settings[-1] == {"cfg_scale": 2, "cfg_schedule": "constant"}
    for bad in ["cfg_scale", "cfg_scale=", "=1,2"]:
        with pytest.raises(ConfigError, match="FIELD=V1,V2"):
            parse_axes([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_axes(["top_k=1", "top_k=2"])


def _report(fd: float, acc: float, copies: float | None = None) -> EvalReport:
    one = MeanStd.of([fd])
    return EvalReport(
        num_samples=10,
        seeds=[0],
        sampler={},
        fd=one,
        fd_real_floor=2.0,
        kid=one,
        precision=MeanStd.of([0.5]),
        recall=MeanStd.of([0.5]),
        class_accuracy=MeanStd.of([acc]),
        classifier_score=None,
        bits_per_token=None,
        feature_extractor="x",
        near_copies=None if copies is None else MeanStd.of([copies]),
    )


def test_frontier_keeps_exactly_the_undominated_points():
    pts = [
        SweepPoint({"cfg_scale": 1}, _report(10.0, 0.80)),  # worst accuracy but lowest FD: on the frontier
        SweepPoint({"cfg_scale": 2}, _report(12.0, 0.95, copies=0.06)),  # on
        SweepPoint({"cfg_scale": 3}, _report(13.0, 0.94, copies=0.4)),  # dominated by cfg 2
        SweepPoint({"cfg_scale": 4}, _report(15.0, 0.99)),  # on
        SweepPoint({"cfg_scale": 5}, _report(15.0, 0.99)),  # a tie dominates neither
    ]
    assert [p.on_frontier for p in mark_frontier(pts)] == [True, True, False, True, True]
    table = rows(pts)
    assert table[1][0] == "cfg_scale=2" and table[1][1].endswith("(6.00x)") and table[1][2] == "95.0%"
    assert table[1][4] == "6.0%" and table[0][4] == "-"  # near-copies, where the report has them
    assert table[2][4] == "40.0% MEMORISING" and pts[2].report.memorising and not pts[1].report.memorising
    assert [r[-1] for r in table] == ["*", "*", "", "*", "*"]
    svg = frontier_svg(pts)
    assert svg.count('class="point"') == 5 and svg.count("★") == 2 * 4  # in each point's label and its tooltip


def test_a_real_sweep_judges_every_setting_on_one_protocol():
    pipe = ARPipeline.from_pretrained("default")
    reference, rest = reference_sets("mnist", 50, 28, 1)
    features = ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))
    seen = []
    points = sweep(
        pipe,
        reference,
        rest,
        features,
        [0],
        {"cfg_scale": [1.0, 4.0]},
        progress=lambda i, n, s: seen.append(s),
        classifier=features,
        top_k=20,
    )
    assert seen == [{"cfg_scale": 1.0}, {"cfg_scale": 4.0}]
    assert [p.report.sampler["cfg_scale"] for p in points] == [1.0, 4.0]
    assert all(p.report.sampler["top_k"] == 20 for p in points)  # the fixed fields apply to every setting
    assert points[0].report.fd_real_floor == points[1].report.fd_real_floor  # one floor for the whole sweep
    # Strong guidance buys class accuracy: unguided, this model's samples are recognisably worse.
    assert points[1].accuracy > points[0].accuracy
    assert any(p.on_frontier for p in points)
    with pytest.raises(ConfigError, match="cfg_scale=-1"):
        sweep(pipe, reference, rest, features, [0], {"cfg_scale": [2.0, -1]}, classifier=features)


def test_eval_sweep_command_prints_the_frontier_and_writes_json_and_svg(tmp_path, capsys):
    from argen.cli import main

    out_json, out_svg = tmp_path / "sweep.json", tmp_path / "frontier.svg"
    argv = ["eval", "-n", "50", "--seeds", "0", "--sweep", "cfg_scale=1,3", "--set", "top_k=20"]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_svg)]) == 0
    printed = capsys.readouterr().out
    assert "cfg_scale=1" in printed and "cfg_scale=3" in printed and "x floor" in printed
    data = json.loads(out_json.read_text())
    assert [d["settings"] for d in data] == [{"cfg_scale": 1}, {"cfg_scale": 3}]
    assert all(d["sampler"]["top_k"] == 20 and d["fd_multiple"] > 0 for d in data)
    assert any(d["on_frontier"] for d in data)
    assert out_svg.read_text().count('class="point"') == 2
    assert main(["eval", "-n", "50", "--sweep", "cfg_scale=1,oops"]) == 2
    assert "--sweep cfg_scale=oops" in capsys.readouterr().err
