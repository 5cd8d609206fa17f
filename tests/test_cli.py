import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from argen.cli import build_parser, main
from argen.data.datasets import mnist_pixels

# The CLI surface users script against: changing it must be a deliberate act that updates this test.
SURFACE = {
    "sample": {
        "--model",
        "--dtype",
        "--labels",
        "-n",
        "--seed",
        "--cfg",
        "--guide",
        "--top-k",
        "--top-p",
        "--temperature",
        "--batch-size",
        "--out",
        "--device",
        "--classifier",
        "--progressive",
        "--compile",
        "--set",
    },
    "edit": {
        "--image",
        "--digit",
        "--model",
        "--box",
        "--outpaint",
        "--label",
        "-n",
        "--seed",
        "--out",
        "--cfg",
        "--guide",
        "--top-k",
        "--top-p",
        "--temperature",
        "--set",
        "--device",
        "--dtype",
    },
    "serve": {
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--max-images",
        "--max-work",
        "--max-rows",
        "--max-queue",
        "--timeout",
        "--no-batching",
        "--device",
        "--open",
    },
    "train-tokenizer": {"--data", "--preset", "--restart-every"},
    "tokenize": {"--tokenizer", "--data", "--out", "--batch-size", "--hflip", "--normalize", "--device"},
    "train": {"--tokens", "--tokenizer", "--preset", "--init", "--reinit"},
    "train-classifier": {"--data", "--eval-data", "--image-size", "--channels"},
    "eval": {
        "--model",
        "--dtype",
        "--data",
        "-n",
        "--n",
        "--seeds",
        "--features",
        "--inception-weights",
        "--classifier",
        "--batch-size",
        "--unguided",
        "--json",
        "--sweep",
        "--plot",
        "--npz",
        "--device",
        "--compile",
        "--cfg",
        "--guide",
        "--top-k",
        "--top-p",
        "--temperature",
        "--set",
    },
    "eval-tokenizer": {"--tokenizer", "--data", "--classifier", "-n", "--n"},
    "bench": {
        "--model",
        "--dtype",
        "--setting",
        "--batch-sizes",
        "--repeats",
        "--threads",
        "--train",
        "--json",
        "--device",
    },
    "report": {
        "--model",
        "--out",
        "--data",
        "-n",
        "--n",
        "--seeds",
        "--cfg-values",
        "--top-k-values",
        "--classifier",
        "--setting",
    },
}
TRAIN_FLAGS = {
    "--out",
    "--steps",
    "--stop-after",
    "--batch-size",
    "--lr",
    "--warmup-steps",
    "--weight-decay",
    "--grad-clip",
    "--ema-decay",
    "--seed",
    "--save-every",
    "--keep-checkpoints",
    "--preview-every",
    "--num-workers",
    "--resume",
    "--overwrite",
    "--device",
    "--precision",
    "--parallel",
    "--grad-accum",
    "--activation-checkpointing",
    "--compile",
    "--set",
}


def test_cli_surface_is_frozen():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SURFACE)
    for name, expected in SURFACE.items():
        options = {s for a in sub.choices[name]._actions for s in a.option_strings} - {"-h", "--help"}
        if name.startswith("train"):
            expected = expected | TRAIN_FLAGS
        assert options == expected, name


def test_sample_takes_any_sampler_field(tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = [
        "sample",
        "--labels",
        "3,7",
        "-n",
        "2",
        "--out",
        str(out),
        "--set",
        "speculative=mc-sjd",
        "--set",
        "window=6",
    ]
    assert main(argv) == 0
    data = np.load(out)
    assert data["images"].shape[0] == 4 and data["images"].dtype == np.uint8 and data["images"].std() > 10
    capsys.readouterr()
    assert main(["sample", "--out", str(out), "--set", "speculativ=sjd"]) == 2
    err = capsys.readouterr().err
    assert "--set: unknown sampler setting(s) ['speculativ']" in err
    assert "did you mean speculative (for speculativ)?" in err
    assert main(["sample", "--out", str(out), "--set", "speculative=medusa"]) == 2
    assert "--set: speculative must be" in capsys.readouterr().err


def test_sample_writes_npz_for_evaluation(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--labels", "3,7", "-n", "2", "--out", str(out), "--classifier", "default"]) == 0
    data = np.load(out)
    assert data["images"].shape == (4, 28, 28, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [3, 3, 7, 7] and data["labels"].dtype == np.int64
    assert "class accuracy" in capsys.readouterr().out


def test_sample_default_grid_has_a_row_per_class(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "-n", "3", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (3 * 30 + 2, 10 * 30 + 2)


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["sample", "--labels", "11", "--out", str(tmp_path / "x.png")]) == 2
    assert "class ids must be in" in capsys.readouterr().err
    assert main(["train-tokenizer", "--out", str(tmp_path / "t"), "--set", "codebok_size=3"]) == 2
    assert "argen train-tokenizer: error: --set: unknown VQConfig field(s) ['codebok_size']" in capsys.readouterr().err


def test_end_to_end_on_an_image_folder(tmp_path, capsys):
    """train-tokenizer -> tokenize -> train -> sample, on real digits written as PNG files."""
    pixels, labels = mnist_pixels()
    for i in range(0, 5000, 125):
        folder = tmp_path / "digits" / f"d{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, ..., 0]).save(folder / f"{i}.png")
    (tmp_path / "digits" / "d0" / "bad.png").write_bytes(b"garbage")
    digits, run = str(tmp_path / "digits"), tmp_path / "run"
    tiny = ["--set", "ch=32", "--set", "codebook_size=64", "--set", "image_channels=1"]
    assert (
        main(
            [
                "train-tokenizer",
                "--data",
                digits,
                "--out",
                str(run / "tok"),
                "--steps",
                "3",
                "--batch-size",
                "8",
                *tiny,
            ]
        )
        == 0
    )
    assert (
        main(["tokenize", "--tokenizer", str(run / "tok" / "final"), "--data", digits, "--out", str(run / "tokens")])
        == 0
    )
    assert (
        main(
            [
                "train",
                "--tokens",
                str(run / "tokens"),
                "--tokenizer",
                str(run / "tok" / "final"),
                "--out",
                str(run / "gen"),
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--set",
                "dim=32",
                "--set",
                "num_layers=1",
                "--set",
                "num_heads=2",
            ]
        )
        == 0
    )
    assert (run / "gen" / "previews" / "step-00000003.png").is_file()
    # A trained pipeline guides as the order's documented default (the shipped raster model's), and says so.
    from argen.models.raster import RasterTransformer

    guidance = dict(RasterTransformer.order.default_sampler)["cfg_scale"]
    sampler = json.loads((run / "gen" / "pipeline" / "pipeline.json").read_text())["sampler"]
    assert sampler["cfg_scale"] == guidance == 2.0
    assert f"default guidance: cfg {guidance}" in capsys.readouterr().out
    out = tmp_path / "s.npz"
    assert (
        main(["sample", "--model", str(run / "gen" / "pipeline"), "--labels", "d3", "-n", "2", "--out", str(out)]) == 0
    )
    assert np.load(out)["images"].shape == (2, 28, 28, 1)

    # Fine-tuning: --init starts from the trained weights (a near-zero lr keeps them), takes the initial
    # generator's architecture over the preset's, applies a --set of a weightless field, and refuses another order.
    from argen.pretrained import load_safetensors

    tune = ["train", "--tokens", str(run / "tokens"), "--steps", "1", "--batch-size", "8", "--lr", "1e-12"]
    assert (
        main([*tune, "--out", str(run / "tuned"), "--init", str(run / "gen" / "final"), "--set", "resid_dropout=0.2"])
        == 0
    )
    before = load_safetensors(run / "gen" / "final" / "model.safetensors")
    after = load_safetensors(run / "tuned" / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name].float(), before[name].float(), rtol=0, atol=1e-6)
    tuned = json.loads((run / "tuned" / "final" / "config.json").read_text())["config"]
    assert (tuned["dim"], tuned["num_layers"], tuned["resid_dropout"]) == (32, 1, 0.2)
    # --reinit: the named module starts fresh, the rest comes from --init; a name matching nothing is refused.
    init = ["--init", str(run / "gen" / "final")]
    # (another seed: the trained run moved its seed-0 initialisation only a little in 3 steps)
    assert main([*tune, "--out", str(run / "fresh"), *init, "--reinit", "output", "--seed", "7"]) == 0
    fresh = load_safetensors(run / "fresh" / "final" / "model.safetensors")
    for name in before:
        if name.startswith("output."):
            assert (fresh[name].float() - before[name].float()).abs().max() > 1e-3, name
        else:
            torch.testing.assert_close(fresh[name].float(), before[name].float(), rtol=0, atol=1e-6)
    assert main([*tune, "--out", str(run / "none"), *init, "--reinit", "outputs"]) == 2
    assert "--reinit outputs: the generator has no module or parameter of that name" in capsys.readouterr().err
    masked = [*tune, "--out", str(run / "m"), "--preset", "mnist-masked", "--init", str(run / "gen" / "final")]
    assert main(masked) == 2
    err = capsys.readouterr().err
    assert "holds a 'raster_transformer', not a 'masked_transformer', which --preset trains (masked order)" in err
    # the kind is checked before the data is read for the preset's order (next-scale would ask for a tokenizer)
    assert main([*masked[:-4], "--preset", "mnist-next-scale", *init]) == 2
    assert "not a 'next_scale_transformer', which --preset trains (next-scale order)" in capsys.readouterr().err


def test_eval_bench_and_tokenizer_commands_print_their_figures(tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "-n",
                "100",
                "--seeds",
                "0",
                "--unguided",
                "--json",
                str(tmp_path / "e.json"),
                "--npz",
                str(tmp_path / "adm.npz"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FD real-vs-real floor" in out and "class accuracy" in out and "N = 100" in out
    assert "x floor)" in out and "quality bar" in out and "guided" in out and "unguided" in out
    reports = json.loads((tmp_path / "e.json").read_text())
    report, unguided = reports["guided"], reports["unguided"]
    assert report["num_samples"] == 100 and report["class_accuracy"]["mean"] > 0.7
    assert report["fd_multiple"] == pytest.approx(report["fd"]["mean"] / report["fd_real_floor"])
    assert unguided["sampler"]["cfg_scale"] == 1.0 and unguided["fd"]["mean"] != report["fd"]["mean"]
    adm = np.load(tmp_path / "adm.npz")
    assert adm["arr_0"].shape == (100, 28, 28, 3) and adm["arr_0"].dtype == np.uint8

    assert (
        main(
            [
                "bench",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--setting",
                "plain:cfg_scale=1",
                "--setting",
                "guided:cfg_scale=3",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ratios against 'plain'" in out and "GFLOP/s" in out
    bench = json.loads((tmp_path / "b.json").read_text())
    assert {r["setting"] for r in bench["sampling"]} == {"plain", "guided"}
    assert main(["bench", "--setting", "x:cfg=3"]) == 2
    err = capsys.readouterr().err
    assert "--setting x: unknown sampler setting(s) ['cfg']" in err and "run/s" not in err  # before any timing
    assert "did you mean cfg_scale (for cfg)?" in err  # the CLI's flag is --cfg, the field cfg_scale

    assert main(["eval-tokenizer", "-n", "200"]) == 0
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out
    anchor = re.search(r"reconstruction FD, N = 200 \(real-data floor [\d.]+\)\s+[\d.]+ \(([\d.]+)x floor\)", out)
    multiple = anchor.group(1)
    assert 0.8 < float(multiple) < 1.5  # the shipped VQ reconstructs digits about as well as real ones score

    assert main(["eval", "-n", "100", "--seeds", "0", "--features", "inception"]) == 0
    assert "skipping Inception FID" in capsys.readouterr().err


def test_edit_and_progressive_commands(tmp_path, capsys):
    out = tmp_path / "edit.png"
    assert (
        main(
            [
                "edit",
                "--model",
                "next-scale",
                "--digit",
                "5",
                "--box",
                "0,14,28,28",
                "--label",
                "7",
                "-n",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (5 * 30 + 2, 32)  # source, kept region, 3 edits
    assert main(["edit", "--digit", "5", "--box", "0,14,40,28", "--out", str(out)]) == 2
    assert "must lie inside" in capsys.readouterr().err
    strip = tmp_path / "scales.png"
    assert (
        main(["sample", "--model", "next-scale", "--progressive", "--labels", "1,2", "-n", "1", "--out", str(strip)])
        == 0
    )
    assert Image.open(strip).size == (7 * 30 + 2, 2 * 30 + 2)  # 7 scales, a row per image


def test_report_page_with_an_acceleration_setting(tmp_path):
    out = tmp_path / "report.html"
    assert (
        main(
            [
                "report",
                "-n",
                "100",
                "--seeds",
                "0",
                "--cfg-values",
                "2",
                "--top-k-values",
                "0",
                "--setting",
                "rows2:parallel_window=2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    page = out.read_text()
    assert page.count('class="point"') == 2 and "rows2" in page and "data:image/png;base64," in page


def test_mar_end_to_end_on_latent_shards(tmp_path, capsys):
    """train-tokenizer (KL) -> eval-tokenizer (latent statistics) -> tokenize (latents) -> train (MAR) -> sample;
    a discrete order on the latent shards is a one-line error, and so is MAR on id shards."""
    pixels, labels = mnist_pixels()
    for i in range(0, 2000, 50):
        folder = tmp_path / "digits" / f"d{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, ..., 0]).save(folder / f"{i}.png")
    digits, run = str(tmp_path / "digits"), tmp_path / "run"
    small = ["--steps", "2", "--batch-size", "8"]
    tok = ["train-tokenizer", "--preset", "mnist-kl", "--data", digits, "--out", str(run / "tok"), *small]
    assert main(tok) == 0
    assert main(["eval-tokenizer", "--tokenizer", str(run / "tok" / "final"), "--data", digits]) == 0
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out and "latent channel 3 mean / std" in out and "KL per image" in out
    assert "skipped: N=1000 needs" in out and "(lower -n)" in out  # 40 digits: no anchor, every other figure
    assert "codebook" not in out
    tokens = ["tokenize", "--tokenizer", str(run / "tok" / "final"), "--data", digits, "--out", str(run / "latents")]
    assert main(tokens) == 0
    scale = json.loads((run / "latents" / "meta.json").read_text())["scale_factor"]
    fields = ["encoder_dim=32", "encoder_heads=2", "encoder_depth=1", "buffer_size=4", "decoder_dim=32"]
    fields += ["decoder_heads=2", "decoder_depth=1", "head_width=32"]
    mar = [arg for field in fields for arg in ("--set", field)]
    train = ["train", "--tokens", str(run / "latents"), "--tokenizer", str(run / "tok" / "final")]
    assert main([*train, "--preset", "mnist-mar", "--out", str(run / "gen"), *small, *mar]) == 0
    pipeline = run / "gen" / "pipeline"
    saved = json.loads((pipeline / "tokenizer" / "config.json").read_text())["config"]
    assert saved["scale_factor"] == scale  # the pipeline decodes with the factor the latents were scaled by
    assert saved["latent_shift"] is None
    images = tmp_path / "s.npz"
    sample = ["sample", "--model", str(pipeline), "--labels", "d3", "-n", "2", "--out", str(images)]
    assert main([*sample, "--set", "steps=4", "--set", "head_steps=5"]) == 0
    assert np.load(images)["images"].shape == (2, 28, 28, 1)
    # latents standardised per channel: the pipeline's tokenizer takes each channel's shift and scale
    assert main([*tokens[:-1], str(run / "std"), "--normalize", "channel"]) == 0
    meta = json.loads((run / "std" / "meta.json").read_text())
    std = ["train", "--tokens", str(run / "std"), "--tokenizer", str(run / "tok" / "final"), "--preset", "mnist-mar"]
    assert main([*std, "--out", str(run / "gen-std"), *small, *mar]) == 0
    saved = json.loads((run / "gen-std" / "pipeline" / "tokenizer" / "config.json").read_text())["config"]
    assert len(meta["scale_factor"]) == 4 and saved["scale_factor"] == meta["scale_factor"]
    assert saved["latent_shift"] == meta["latent_shift"]
    capsys.readouterr()
    assert main([*train, "--preset", "mnist-small", "--out", str(run / "raster"), *small]) == 2
    err = capsys.readouterr().err
    assert "holds continuous tokens" in err and "raster order models discrete" in err and "\n" == err[-1]
    assert main(["train-tokenizer", "--data", digits, "--out", str(run / "vq"), *small, "--set", "ch=32"]) == 0
    vq = str(run / "vq" / "final")
    assert main(["tokenize", "--tokenizer", vq, "--data", digits, "--out", str(run / "ids")]) == 0
    capsys.readouterr()
    ids = ["train", "--tokens", str(run / "ids"), "--tokenizer", vq, "--preset", "mnist-mar"]
    assert main([*ids, "--out", str(run / "mar-on-ids"), *small]) == 2
    assert "mar order models continuous" in capsys.readouterr().err
