"""Faults a careless or unlucky user meets while training: a second run into the same folder, a dangling
`latest`, tampered or non-finite checkpoints, a full disk, a read-only folder. Every case must end in one argen
error naming the problem, and no valid checkpoint may be lost. The checkpoints are written by real tiny runs."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from argen.data.shards import TokenShards
from argen.errors import CheckpointError, ConfigError, NonFiniteError, StorageError
from argen.train import checkpoint
from argen.train.loop import TrainConfig, train
from argen.train.tasks import GeneratorTask
from tests.train.worker import build_model

ROOT = Path(__file__).resolve().parents[2]


def run(
    run_dir: Path, shards_dir: Path, steps: int, task_class=GeneratorTask, keep_checkpoints: int = 2, **kwargs
) -> None:
    """A real tiny run: checkpoints every 5 steps (the last 2 kept), a log record every 5, EMA on."""
    shards = TokenShards(shards_dir)
    config = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        save_every=5,
        log_every=5,
        keep_checkpoints=keep_checkpoints,
    )
    train(task_class(build_model(shards.vocab_size)), shards, config, run_dir, progress=False, **kwargs)


def steps_on_disk(run_dir: Path) -> list[int]:
    return [int(d.name[5:]) for d in checkpoint.step_folders(run_dir)]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


class CrashAfter20(GeneratorTask):
    """Dies at step 21, as a killed run does: checkpoints 15 and 20 on disk, no final weights."""

    def loss(self, module, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 20:
            raise KeyboardInterrupt
        return super().loss(module, batch)


@pytest.fixture(scope="module")
def run20(tmp_path_factory, mnist_shards):
    """A 25-step run interrupted after step 20; tests copy it before changing anything, and resume it."""
    run_dir = tmp_path_factory.mktemp("run20") / "R"
    with pytest.raises(KeyboardInterrupt):
        run(run_dir, mnist_shards, 25, task_class=CrashAfter20)
    return run_dir


@pytest.fixture
def copy20(run20, tmp_path):
    shutil.copytree(run20, tmp_path / "R")
    return tmp_path / "R"


# --- 1. no run deletes another run's checkpoints -------------------------------------------------------------


def test_a_second_run_without_resume_is_refused_and_deletes_nothing(copy20, mnist_shards):
    with pytest.raises(ConfigError, match="already holds a training run .*step-00000020.*--resume.*--overwrite"):
        run(copy20, mnist_shards, 10)
    assert steps_on_disk(copy20) == [15, 20] and checkpoint.latest_checkpoint(copy20).name == "step-00000020"


def test_overwrite_replaces_the_previous_run_and_says_so(copy20, mnist_shards, caplog):
    with caplog.at_level(logging.WARNING):
        run(copy20, mnist_shards, 10, overwrite=True)
    assert "deleting the previous run" in caplog.text
    assert steps_on_disk(copy20) == [5, 10] and logged_steps(copy20) == [5, 10]


@pytest.mark.parametrize("latest", ["empty", "missing", "dangling"])
def test_resume_with_an_unusable_latest_takes_the_newest_complete_checkpoint(copy20, mnist_shards, caplog, latest):
    pointer = copy20 / "checkpoints" / "latest"
    if latest == "missing":
        pointer.unlink()
    else:
        pointer.write_text("" if latest == "empty" else "step-00000099")
    with caplog.at_level(logging.INFO):
        run(copy20, mnist_shards, 25, resume=True)
    assert "step-00000020 at step 20" in caplog.text
    # 15 was superseded by 20 and 25 (keep 2); nothing else went.
    assert steps_on_disk(copy20) == [20, 25] and pointer.read_text() == "step-00000025"


def test_cleanup_removes_only_interrupted_writes_newer_than_the_newest_complete(copy20, mnist_shards):
    ckpts = copy20 / "checkpoints"
    shutil.copytree(ckpts / "step-00000020" / "model", ckpts / "step-00000025" / "model")  # killed before its state
    shutil.copytree(ckpts / "step-00000020", ckpts / "step-00000030")
    (ckpts / "step-00000030" / checkpoint.STATE_NAME).write_bytes(b"damaged")  # corrupt, not interrupted: kept
    (ckpts / "step-00000020" / ".model.safetensors.x.tmp").write_bytes(b"half")
    assert checkpoint.latest_checkpoint(copy20).name == "step-00000020"
    assert checkpoint.clean_run_dir(copy20) == 2  # the temp file and step 25
    assert steps_on_disk(copy20) == [15, 20, 30]


def test_pruning_never_removes_a_newer_checkpoint(copy20):
    ckpts = copy20 / "checkpoints"
    shutil.copytree(ckpts / "step-00000020", ckpts / "step-00000099")  # e.g. a run a person copied in
    model = build_model(512)
    state = torch.load(ckpts / "step-00000020" / checkpoint.STATE_NAME, weights_only=True)
    checkpoint.save_checkpoint(copy20, 21, model, None, state, keep=1)
    assert steps_on_disk(copy20) == [21, 99]


def test_keep_checkpoints_zero_keeps_every_one_and_resume_still_works(tmp_path, mnist_shards):
    """Picking a checkpoint by FD afterwards needs them all on disk; the setting is bookkeeping, so a resume
    under another value is allowed."""
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "R", mnist_shards, 25, task_class=CrashAfter20, keep_checkpoints=0)
    assert steps_on_disk(tmp_path / "R") == [5, 10, 15, 20]
    run(tmp_path / "R", mnist_shards, 25, resume=True)  # the default again: keep 2
    assert steps_on_disk(tmp_path / "R") == [20, 25]


# --- 2. every resumed state loads strictly ---------------------------------------------------------------------


def tamper_weights(path: Path, how: str) -> str:
    tensors = load_file(path)
    key = sorted(tensors)[0]
    if how == "missing":
        del tensors[key]
    elif how == "shrunk":
        tensors[key] = tensors[key].flatten()[:1].clone()
    else:
        key = "foreign.weight"
        tensors[key] = torch.zeros(3)
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("part", ["model", "ema"])
@pytest.mark.parametrize("how,says", [("missing", "missing keys"), ("shrunk", "shape of"), ("foreign", "unexpected")])
def test_resume_refuses_tampered_weights_naming_the_key(copy20, mnist_shards, part, how, says):
    for step in (15, 20):  # the older checkpoint must not be a silent fallback either: both are tampered
        key = tamper_weights(copy20 / f"checkpoints/step-{step:08d}/{part}/model.safetensors", how)
    with pytest.raises(CheckpointError, match=f"(?s){says}.*{key}"):
        run(copy20, mnist_shards, 25, resume=True)


def rewrite_state(run_dir: Path, change) -> None:
    path = run_dir / "checkpoints" / "step-00000020" / checkpoint.STATE_NAME
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def shrink_moment(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1)


@pytest.mark.parametrize(
    "change,says",
    [
        (shrink_moment, "optimizer state does not match the model: .*exp_avg: shape"),
        (lambda s: s.pop("skipped"), r"missing keys \['skipped'\]"),
        (lambda s: s.update(extra=1), r"unexpected \['extra'\]"),
        (lambda s: s.update(ema_updates=-3), "EMA update count"),
    ],
)
def test_resume_refuses_a_tampered_trainer_state(copy20, mnist_shards, change, says):
    rewrite_state(copy20, change)
    with pytest.raises(CheckpointError, match=says):
        run(copy20, mnist_shards, 25, resume=True)


def test_resume_refuses_a_missing_ema_when_ema_is_on(copy20, mnist_shards):
    for step in (15, 20):
        shutil.rmtree(copy20 / f"checkpoints/step-{step:08d}/ema")
    with pytest.raises(CheckpointError, match="no ema/ folder, but EMA is on"):
        run(copy20, mnist_shards, 25, resume=True)


# --- 3. non-finite values are refused, never saved, never loaded -----------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("warmup_steps", -10),
        ("steps", 0),
        ("batch_size", 0),
        ("grad_clip", float("nan")),
        ("weight_decay", float("inf")),
        ("ema_decay", 1.0),
        ("min_lr_ratio", 2.0),
        ("betas", (0.9, float("nan"))),
        ("steps", 2.5),
    ],
)
def test_training_config_refuses_invalid_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"training config: {field} "):
        TrainConfig(**{field: value})


class PoisonAfter(GeneratorTask):
    """Sets one weight to NaN after step 6 (a divergence the loss has not seen yet)."""

    def after_step(self, step, batch, info):
        if step == 6:
            with torch.no_grad():
                next(self.model.parameters())[0] = float("nan")


def test_non_finite_weights_are_never_saved(tmp_path, mnist_shards):
    poisoned = next(build_model(512).named_parameters())[0]
    with pytest.raises(NonFiniteError, match=f"not saving non-finite weights '{poisoned}'.*step-00000005"):
        run(tmp_path, mnist_shards, 20, task_class=PoisonAfter)
    assert steps_on_disk(tmp_path) == [5] and checkpoint.latest_checkpoint(tmp_path).name == "step-00000005"
    assert not (tmp_path / "final").exists()


class NaNLossFrom(GeneratorTask):
    def loss(self, module, batch):
        loss, n = super().loss(module, batch)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * float("nan") if self.calls > 7 else loss), n


def test_the_abort_message_names_the_last_complete_checkpoint(tmp_path, mnist_shards):
    # Skipped steps leave the weights untouched, so step 10 (amid the NaN losses) is still a good checkpoint.
    with pytest.raises(NonFiniteError, match="in a row .*the last complete checkpoint is .*step-00000010"):
        run(tmp_path, mnist_shards, 20, task_class=NaNLossFrom)


def test_resume_refuses_a_checkpoint_with_nan_weights(copy20, mnist_shards):
    for step in (15, 20):
        path = copy20 / f"checkpoints/step-{step:08d}/ema/model.safetensors"
        tensors = load_file(path)
        tensors["norm.weight"][0] = float("nan")
        save_file(tensors, path)
    with pytest.raises(NonFiniteError, match="ema holds non-finite weights: 'norm.weight'") as e:
        run(copy20, mnist_shards, 25, resume=True)
    assert isinstance(e.value, CheckpointError)


# --- 4. the log after a resume ----------------------------------------------------------------------------------


def test_resume_truncates_the_log_to_the_resumed_step(copy20, mnist_shards):
    # A kill after step 20 was logged but before its checkpoint completed: the state file is the last written.
    (copy20 / "checkpoints" / "step-00000020" / checkpoint.STATE_NAME).unlink()
    with open(copy20 / "log.jsonl", "a") as f:
        f.write('{"step": 2')  # and a torn last line
    run(copy20, mnist_shards, 25, resume=True)
    assert logged_steps(copy20) == [5, 10, 15, 20, 25]


# --- 5. full disk and read-only folders -------------------------------------------------------------------------


def no_partial_files(run_dir: Path) -> None:
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or p.stat().st_size == 0]


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    "target,code,says",
    [
        ("argen.pretrained.save_file", errno.ENOSPC, r"no space left on device while writing \S+/model.safetensors"),
        ("torch.save", errno.ENOSPC, r"no space left on device while writing \S+/trainer_state.pt"),
        ("tempfile.mkstemp", errno.EROFS, r"read-only file system while writing \S+"),
        ("tempfile.mkstemp", errno.EACCES, r"permission denied \(the folder is not writable\) while writing \S+"),
    ],
)
def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_partial_files(
    copy20, mnist_shards, monkeypatch, target, code, says
):
    monkeypatch.setattr(target, failing(code))
    with pytest.raises(StorageError, match=f"{says}; the last complete checkpoint is \\S+step-00000020$") as e:
        run(copy20, mnist_shards, 25, resume=True)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert steps_on_disk(copy20) == [15, 20] and checkpoint.latest_checkpoint(copy20).name == "step-00000020"
    no_partial_files(copy20)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod 555) folder anyway")
def test_a_read_only_run_folder(copy20, mnist_shards):
    ckpts = copy20 / "checkpoints"
    os.chmod(ckpts, 0o555)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            run(copy20, mnist_shards, 25, resume=True)
    finally:
        os.chmod(ckpts, 0o755)


FILE_SIZE_LIMIT = """
import resource, signal, sys
import torch
from tests.train.worker import build_model
from argen.pretrained import save_pretrained
from argen.errors import StorageError
model = build_model(512)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    save_pretrained(model, sys.argv[1])
except StorageError as e:
    print(e)
"""


def test_a_real_file_size_limit_is_a_storage_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "m")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"file size limit exceeded while writing {tmp_path / 'm' / 'model.safetensors'}"
    assert not list((tmp_path / "m").iterdir())
