"""Every mistake a user can make on the command line ends in one line, `argen CMD: error: ...`, naming the bad
option or field, a non-zero exit and no traceback (issue 14). `--debug` still shows the traceback."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import argen.cli
from argen.cli import build_parser, main
from argen.errors import ConfigError
from argen.pipeline import ASSETS, PIPELINE_NAME, SHIPPED


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert it failed with exactly one error line on stderr and return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, argv
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith(f"argen {argv[0]}: error: "), (argv, err)
    assert "Traceback" not in err
    return lines[0]


def usage_error_line(capsys, argv: list[str]) -> str:
    """Like one_error_line, for mistakes argparse catches (it exits through SystemExit)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"argen {argv[0]}: error: "), (argv, err)
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny token-shard folder (16 digits through the shipped raster tokenizer)."""
    from argen.data.datasets import ArrayDataset, load_dataset
    from argen.data.shards import write_shards
    from argen.pretrained import load_pretrained

    tokenizer = load_pretrained(ASSETS / "raster-mnist" / "tokenizer")
    data = ArrayDataset.of(load_dataset("mnist:test", tokenizer.config.image_size, 1)).subset(list(range(16)))
    return write_shards(tokenizer, data, tmp_path_factory.mktemp("shards") / "tokens")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sample", "-n", "-5"], "argument -n: must be an integer >= 1, got -5"),
        (["sample", "-n", "0"], "argument -n: must be an integer >= 1, got 0"),
        (["sample", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["sample", "--out", "samples.txt"], "unknown image extension '.txt'"),
        (["sample", "--cfg", "nan"], "argument --cfg: must be a finite number"),
        (["sample", "--cfg", "inf"], "argument --cfg: must be a finite number"),
        (["edit", "--digit", "-1", "--box", "0,0,9,9"], "argument --digit: must be an integer >= 0, got -1"),
        (["train-tokenizer", "--out", "r", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    ],
)
def test_usage_mistakes_are_one_line(capsys, argv, named):
    assert named in usage_error_line(capsys, argv)


def test_output_that_is_an_existing_file_is_refused_before_training(tmp_path, capsys):
    existing = tmp_path / "passwd"
    existing.write_text("root:x:0:0\n")
    line = usage_error_line(capsys, ["train", "--tokens", str(tmp_path), "--out", str(existing)])
    assert f"argument --out: {existing} is an existing file" in line
    assert existing.read_text() == "root:x:0:0\n"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sample", "--cfg", "-1"], "--cfg -1.0: cfg_scale must be >= 0"),
        (["sample", "--top-k", "-5"], "--top-k -5: top_k must be an integer >= 0"),
        (["sample", "--top-p", "0"], "--top-p 0.0: top_p must be in (0, 1]"),
        (["sample", "--top-p", "1.5"], "--top-p 1.5: top_p must be in (0, 1]"),
        (["sample", "--temperature", "-1"], "--temperature -1.0: temperature must be"),
        (["sample", "--set", "cfg_scale=-1"], "--set: cfg_scale must be >= 0"),
        (["sample", "--set", "speculative=medusa"], "--set: speculative must be"),
        (["sample", "--set", "window"], "--set expects FIELD=VALUE, got 'window'"),
        (["sample", "--device", "cuda:99"], "--device cuda:99"),
        (["sample", "--device", "potato"], "--device 'potato' is not a device"),
        (["sample", "--progressive", "--out", "x.npz"], "--progressive writes an image strip"),
        (["edit", "--digit", "1", "--box", "0,0,9,9", "-n", "1000000"], "at most 100,000"),
        (["bench", "--setting", "x:top_k=-1"], "--setting 'x:top_k=-1': top_k must be an integer >= 0"),
    ],
)
def test_bad_sampler_values_are_named_by_their_option(capsys, argv, named):
    line = one_error_line(capsys, argv)
    assert named in line
    if argv[1] != "--set":
        assert "--set:" not in line  # issue 14: --cfg -1 was reported as a --set error


@pytest.mark.parametrize(
    ("command", "fields", "named"),
    [
        ("train-tokenizer", ["codebook_size=0"], "--set: VQConfig.codebook_size must be an integer >= 2, got 0"),
        ("train-tokenizer", ["image_size=30"], "--set: VQConfig.image_size=30 is not a multiple"),
        ("train-tokenizer", ["ch=-32"], "--set: VQConfig.ch must be an integer >= 32, got -32"),
        ("train-tokenizer", ["codebok_size=3"], "--set: unknown VQConfig field(s) ['codebok_size']"),
        ("train", ["num_heads=0"], "--set: RasterConfig.num_heads must be an integer >= 1, got 0"),
        ("train", ["dim=-5"], "--set: RasterConfig.dim must be an integer >= 1, got -5"),
        ("train", ["dim=30", "num_heads=4"], "dim=30 is not divisible by num_heads=4"),
        ("train", ["class_dropout=1.5"], "RasterConfig.class_dropout must be a finite number >= 0.0 and < 1.0"),
        ("train", ["dim=abc"], "RasterConfig.dim must be an integer >= 1, got 'abc'"),
    ],
)
def test_bad_model_fields_are_one_line_naming_the_field(tmp_path, capsys, shards, command, fields, named):
    argv = [command, "--out", str(tmp_path / "run"), "--steps", "1"]
    if command == "train":
        argv += ["--tokens", str(shards)]
    for field in fields:
        argv += ["--set", field]
    assert named in one_error_line(capsys, argv)
    assert not (tmp_path / "run" / "final").exists()


def _broken_copy(tmp_path, component: str, **fields) -> os.PathLike:
    """The shipped raster pipeline with some config fields of one component overwritten."""
    folder = tmp_path / "pipe"
    shutil.copytree(ASSETS / "raster-mnist", folder)
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    config["config"].update(fields)
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("fields", "named"), [({"codebook_size": 0}, "codebook_size"), ({"ch": -5}, "ch")])
def test_invalid_values_in_a_tokenizer_config_json_name_the_file(tmp_path, capsys, fields, named):
    folder = _broken_copy(tmp_path, "tokenizer", **fields)
    line = one_error_line(capsys, ["eval-tokenizer", "--tokenizer", str(folder / "tokenizer")])
    assert str(folder / "tokenizer" / "config.json") in line and f"VQConfig.{named}" in line


@pytest.mark.parametrize(("fields", "named"), [({"num_heads": 0}, "num_heads"), ({"dim": -5}, "dim")])
def test_invalid_values_in_a_generator_config_json_name_the_file(tmp_path, capsys, fields, named):
    folder = _broken_copy(tmp_path, "generator", **fields)
    line = one_error_line(capsys, ["sample", "--model", str(folder), "-n", "1", "--out", str(tmp_path / "s.png")])
    assert str(folder / "generator" / "config.json") in line and f"RasterConfig.{named}" in line


@pytest.mark.parametrize("command", ["tokenize", "eval-tokenizer", "train"])
def test_a_generator_given_as_tokenizer_is_refused_naming_what_it_holds(tmp_path, capsys, command):
    generator = str(ASSETS / "raster-mnist" / "generator")
    if command == "tokenize":
        argv = ["tokenize", "--tokenizer", generator, "--out", str(tmp_path / "t")]
    elif command == "eval-tokenizer":
        argv = ["eval-tokenizer", "--tokenizer", generator]
    else:
        tokens = str(_tokens(tmp_path))
        capsys.readouterr()
        argv = ["train", "--tokens", tokens, "--tokenizer", generator, "--out", str(tmp_path / "r")]
    line = one_error_line(capsys, argv)
    assert "holds a 'raster_transformer', not a tokenizer" in line and "vq_tokenizer" in line
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


def _tokens(tmp_path) -> os.PathLike:
    """A few shipped-tokenizer token shards of real digits."""
    out = tmp_path / "tokens"
    assert main(["tokenize", "--tokenizer", "raster", "--data", "mnist:test", "--out", str(out)]) == 0
    return out


def test_tokenize_takes_a_pipeline_name_as_its_tokenizer(tmp_path, capsys):
    out = _tokens(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seq_len"] == 49 and meta["vocab_size"] == 512


def test_digit_out_of_range(capsys, tmp_path):
    line = one_error_line(capsys, ["edit", "--digit", "100000", "--box", "0,0,9,9", "--out", str(tmp_path / "e.png")])
    assert "--digit 100000 is out of range" in line


def test_a_huge_request_is_refused_before_any_work_and_the_total_is_printed(capsys, tmp_path):
    line = one_error_line(capsys, ["sample", "-n", "1000000000", "--out", str(tmp_path / "s.png")])
    assert "10,000,000,000 images" in line and "at most 100,000" in line
    assert not (tmp_path / "s.png").exists()
    assert main(["sample", "--labels", "3,7", "-n", "2", "--out", str(tmp_path / "s.npz")]) == 0
    assert "sampling 4 images: 2 label(s) x 2 per label" in capsys.readouterr().out


def _hostile_pickle(path) -> None:
    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps({"step": Hostile()}))


def test_refused_unpickling_hides_torchs_weights_only_advice(tmp_path, capsys, monkeypatch):
    hostile = tmp_path / "trainer_state.pt"
    _hostile_pickle(hostile)
    monkeypatch.setattr(argen.cli, "cmd_sample", lambda args: torch.load(hostile, weights_only=True))
    line = one_error_line(capsys, ["sample"])
    assert "refused to unpickle" in line and "weights_only" not in line


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device", "out/model.safetensors"), PermissionError(13, "Permission denied", "o")],
)
def test_os_errors_are_one_line(capsys, monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(argen.cli, "cmd_sample", fail)
    assert error.strerror in one_error_line(capsys, ["sample"])


def test_multi_line_messages_become_one_line(capsys, monkeypatch):
    def fail(args):
        raise ValueError("checkpoint does not match:\n  missing keys (1): ['w']\n  unexpected keys (1): ['v']")

    monkeypatch.setattr(argen.cli, "cmd_sample", fail)
    assert "missing keys (1): ['w']; unexpected keys (1): ['v']" in one_error_line(capsys, ["sample"])


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(monkeypatch):
    with pytest.raises(ConfigError, match="--device cuda:99"):
        main(["--debug", "sample", "--device", "cuda:99"])

    def bug(args):
        raise ZeroDivisionError("a bug in argen")

    monkeypatch.setattr(argen.cli, "cmd_sample", bug)
    with pytest.raises(ZeroDivisionError):
        main(["sample"])


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "-n", "-5"],
        ["sample", "--device", "cuda:99"],
        ["train-tokenizer", "--out", "never-written", "--set", "codebook_size=0"],
    ],
)
def test_no_traceback_reaches_stderr(tmp_path, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "argen.cli", *argv], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"argen {argv[0]}: error: "), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "never-written").exists()


def _subcommands() -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_shows_every_default_and_describes_every_option(command):
    parser = _subcommands()[command]
    one_of = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no description"
        flag_like = action.nargs == 0 or action in one_of  # store_true: off unless given; one of a required pair
        if not action.required and not flag_like and action.default is not None:
            assert "(default" in parser.formatter_class(command)._get_help_string(action), (command, action)
        elif not action.required and not flag_like:
            assert "default" in action.help, (command, action.option_strings)  # says what happens without it
    text = parser.format_help()
    for option in ("--model", "--preset"):
        action = next((a for a in parser._actions if option in a.option_strings), None)
        if action is not None and option == "--model":
            assert all(name in action.help for name in SHIPPED), action.help
        if action is not None and option == "--preset":
            assert action.choices and all(name in text for name in action.choices)


def test_help_states_each_shipped_models_guidance():
    cfg = next(a for a in _subcommands()["sample"]._actions if "--cfg" in a.option_strings)
    assert "1 = none" in cfg.help
    for folder in set(SHIPPED.values()):
        sampler = json.loads((ASSETS / folder / PIPELINE_NAME).read_text())["sampler"]
        assert f"{folder} {sampler['cfg_scale']} ({sampler['cfg_schedule']} schedule)" in cfg.help


def test_reinit_takes_a_fresh_wider_head_and_everything_else_from_init():
    """`argen train --init G --reinit diffloss --set head_width=64`: MAR's transformer from G, a wider head fresh."""
    from argen.cli.train import _copy_weights
    from argen.models.mar import MARConfig, MARTransformer

    small = dict(latent_size=3, latent_channels=4, encoder_dim=32, decoder_dim=32, encoder_heads=2, decoder_heads=2)
    small.update(encoder_depth=1, decoder_depth=1, buffer_size=4, head_depth=2, num_classes=3)
    torch.manual_seed(0)
    init = MARTransformer(MARConfig(**small, head_width=32))
    torch.manual_seed(1)
    model = MARTransformer(MARConfig(**small, head_width=64))
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("diffloss.")}
    _copy_weights(init, model, "G", ["diffloss"])
    for name, value in model.state_dict().items():
        expected = fresh_head[name] if name.startswith("diffloss.") else init.state_dict()[name]
        assert torch.equal(value, expected), name
    with pytest.raises(ConfigError, match="does not fit the generator being trained"):
        _copy_weights(init, MARTransformer(MARConfig(**small, head_width=64)), "G")  # no --reinit: refused


def test_reinit_of_blocks_the_init_lacks_grows_the_head_without_changing_it():
    """`--init G --reinit diffloss.net.res_blocks.2 --set head_depth=3`: a deeper head whose new block starts as the
    identity (DiT's zero-initialised gates), so the grown model predicts exactly what the trained one did."""
    from argen.cli.train import _copy_weights
    from argen.models.mar import MARConfig, MARTransformer

    small = dict(latent_size=3, latent_channels=4, encoder_dim=32, decoder_dim=32, encoder_heads=2, decoder_heads=2)
    small.update(encoder_depth=1, decoder_depth=1, buffer_size=4, head_width=32, num_classes=3)
    torch.manual_seed(0)
    init = MARTransformer(MARConfig(**small, head_depth=2))
    with torch.no_grad():  # "trained": no zero gates or outputs left, so the head's output is not trivially zero
        for p in init.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = MARTransformer(MARConfig(**small, head_depth=3))
    _copy_weights(init, model, "G", ["diffloss.net.res_blocks.2"])
    x, t, z = torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 32)
    expected = init.head(x, t, z)
    assert expected.abs().min() > 0
    torch.testing.assert_close(model.head(x, t, z), expected, rtol=0, atol=0)
    with torch.no_grad():  # the new block is live: once its gates move, the output does
        model.diffloss.net.res_blocks[2].adaLN_modulation[-1].bias.fill_(0.5)
    assert not torch.allclose(model.head(x, t, z), expected)
