"""`argen eval` and `argen tokenize` under torchrun (2 gloo processes on CPU) write what one process writes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from argen.data.datasets import mnist_pixels
from tests.conftest import tiny_vq

ROOT = Path(__file__).resolve().parents[2]


def run_argen(*args: str, ranks: int) -> subprocess.CompletedProcess:
    """`argen ARGS` in one process, or under torchrun with `ranks` gloo processes; fails the test on an error."""
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if ranks > 1:
        launch.append(f"--nproc_per_node={ranks}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [*launch, "-m", "argen.cli", *args], env=env, cwd=ROOT, timeout=300, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_eval_on_two_ranks_writes_the_single_process_report_and_samples(tmp_path):
    # 40 samples per seed in batches of 15: rank 0 samples batches 0 and 2 (15 + 10 images), rank 1 batch 1.
    common = ["eval", "-n", "40", "--seeds", "0", "3", "--batch-size", "15", "--unguided"]
    outputs = {}
    for ranks in (1, 2):
        json_path, npz_path = tmp_path / f"report{ranks}.json", tmp_path / f"samples{ranks}.npz"
        out = run_argen(*common, "--json", str(json_path), "--npz", str(npz_path), ranks=ranks)
        outputs[ranks] = (json_path.read_bytes(), npz_path.read_bytes(), out.stdout)
    assert outputs[2][0] == outputs[1][0], "the 2-rank JSON report differs from the 1-process one"
    assert outputs[2][1] == outputs[1][1], "the 2-rank samples differ from the 1-process ones"
    assert outputs[2][2].count("quality bar") == 1  # rank 0 alone prints the table


@pytest.mark.slow
def test_tokenize_on_two_ranks_writes_the_single_process_shards(tmp_path):
    pixels, labels = mnist_pixels()
    for i in range(0, 5000, 200):  # 25 digits
        folder = tmp_path / "digits" / f"d{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, ..., 0]).resize((16, 16)).save(folder / f"{i}.png")
    (tmp_path / "digits" / "d0" / "bad.png").write_bytes(b"garbage")
    tiny_vq(image_size=16).save_pretrained(tmp_path / "tokenizer")
    written, warnings = {}, {}
    for ranks in (1, 2):
        out_dir = tmp_path / f"tokens{ranks}"
        args = ["--tokenizer", str(tmp_path / "tokenizer"), "--data", str(tmp_path / "digits"), "--out", str(out_dir)]
        out = run_argen("tokenize", *args, "--batch-size", "4", "--hflip", ranks=ranks)
        written[ranks] = {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}
        warnings[ranks] = out.stderr.count("bad.png")
    # The folder is checked once, by rank 0: the bad file is reported as often as by one process, not per rank.
    assert warnings[2] == warnings[1] > 0
    assert written[2].keys() == written[1].keys() and len(written[1]) == 3  # meta, tokens, labels
    for name in written[1]:
        assert written[2][name] == written[1][name], f"{name} differs between 1 and 2 ranks"
    tokens = np.load(tmp_path / "tokens2" / "tokens-00000.npy")
    assert tokens.shape == (2 * 25, 64)  # every image and its mirror, once
