import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from argen.data.datasets import load_dataset, split_indices
from argen.data.shards import TokenShards
from argen.errors import CheckpointError, ConfigError, NonFiniteError
from argen.eval.classifier import ClassifierConfig, ImageClassifier, accuracy
from argen.models.raster import RasterTransformer
from argen.train import checkpoint
from argen.train.loop import StepBatches, TrainConfig, train
from argen.train.optim import warmup_cosine
from argen.train.tasks import ClassifierTask, GeneratorTask
from tests.train.worker import build_model

WORKER = Path(__file__).parent / "worker.py"
ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def test_training_learns_real_digits(tmp_path):
    data = load_dataset("mnist", 28)
    train_idx, held_idx = split_indices(data.labels, held_out_per_class=20)
    torch.manual_seed(0)
    model = ImageClassifier(ClassifierConfig(width=16, feature_dim=32))
    config = TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0, save_every=0)
    result = train(ClassifierTask(model), data.subset(train_idx), config, tmp_path, progress=False)
    held = data.subset(held_idx)
    assert accuracy(model, held.images, held.labels) > 0.8  # chance is 0.1
    assert (tmp_path / "final" / "model.safetensors").is_file() and result.skipped_steps == 0
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 15


def tiny_generator(shards: TokenShards) -> RasterTransformer:
    return build_model(shards.vocab_size)


class NaNAt(GeneratorTask):
    """Returns a NaN loss on the given calls and records the weights seen at every call."""

    def __init__(self, model, bad_calls):
        super().__init__(model)
        self.bad_calls, self.calls, self.seen = set(bad_calls), 0, []

    def loss(self, module, batch):
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        loss, n = super().loss(module, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.bad_calls else loss), n


def test_non_finite_loss_skips_the_step_without_moving_weights(tmp_path, mnist_shards):
    shards = TokenShards(mnist_shards)
    task = NaNAt(tiny_generator(shards), bad_calls={1})
    config = TrainConfig(steps=3, batch_size=16, ema_decay=0, save_every=0)
    result = train(task, shards, config, tmp_path, progress=False)
    assert result.skipped_steps == 1
    before, after_skip = task.seen[1], task.seen[2]
    assert all(torch.equal(before[k], after_skip[k]) for k in before)
    assert not all(torch.equal(task.seen[0][k], task.seen[1][k]) for k in before)  # good steps do move


def test_repeated_non_finite_steps_abort(tmp_path, mnist_shards):
    shards = TokenShards(mnist_shards)
    task = NaNAt(tiny_generator(shards), bad_calls=range(100))
    with pytest.raises(NonFiniteError, match="non-finite steps in a row"):
        train(
            task, shards, TrainConfig(steps=10, batch_size=16, max_bad_steps=3, save_every=0), tmp_path, progress=False
        )


def test_batches_are_a_function_of_the_step_and_split_across_ranks():
    full = list(StepBatches(100, 10, seed=3, start=0, stop=25, rank=0, world=1))
    assert list(StepBatches(100, 10, seed=3, start=12, stop=25, rank=0, world=1)) == full[12:]
    ranks = [list(StepBatches(100, 10, seed=3, start=0, stop=25, rank=r, world=2)) for r in range(2)]
    for step in range(25):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(full[step])
    assert sorted(sum(full[:10], [])) == list(range(100))  # an epoch sees every item once


def run_worker(run_dir, shards, *extra, wait=True):
    cmd = [sys.executable, str(WORKER), str(run_dir), str(shards), *extra]
    if wait:
        subprocess.run(cmd, check=True, env=env(), timeout=600)
        return None
    return subprocess.Popen(cmd, env=env())


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, mnist_shards):
    run_worker(tmp_path / "straight", mnist_shards, "--steps", "40")
    proc = run_worker(tmp_path / "killed", mnist_shards, "--steps", "40", "--sleep", "0.1", wait=False)
    deadline = time.time() + 300
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    while time.time() < deadline:
        if latest.is_file() and latest.read_text().strip() >= "step-00000015":
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    # A killed writer may leave a temp file behind: resume must clean it up.
    (latest.parent / ".latest.garbage.tmp").write_text("half-written")
    run_worker(tmp_path / "killed", mnist_shards, "--steps", "40", "--resume")
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))
    for sub in ("final", "checkpoints/step-00000040/model"):
        a, b = weights(tmp_path / "straight" / sub), weights(tmp_path / "killed" / sub)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{sub}: resumed weights differ"


def test_stop_after_cuts_the_schedule_and_resume_finishes_it_exactly(tmp_path, mnist_shards):
    """A run cut by --stop-after follows the whole run's lr schedule, ends with final/ as a run would, and
    --resume without the cut ends with the weights of the uninterrupted run."""
    shards = TokenShards(mnist_shards)

    def run(folder, stop_after, resume=False):
        config = TrainConfig(steps=12, stop_after=stop_after, batch_size=16, lr=3e-3, warmup_steps=2, save_every=5)
        return train(GeneratorTask(tiny_generator(shards)), shards, config, folder, resume=resume, progress=False)

    straight = run(tmp_path / "straight", 0)
    cut = run(tmp_path / "cut", 7)
    assert cut.steps == 7 and straight.steps == 12
    assert [int(d.name[5:]) for d in checkpoint.step_folders(tmp_path / "cut")] == [5, 7]
    last = json.loads((tmp_path / "cut" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 7 and last["lr"] == pytest.approx(3e-3 * warmup_cosine(6, 12, 2, 0.1))
    assert last["lr"] > 0.5 * 3e-3  # mid-schedule, not annealed as a 7-step run would end
    assert (tmp_path / "cut" / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="already at step 7"):
        run(tmp_path / "cut", 5, resume=True)
    run(tmp_path / "cut", 0, resume=True)
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), "a cut run resumed to the end differs from the straight one"
    with pytest.raises(ConfigError, match="past the run's 12 steps"):
        TrainConfig(steps=12, stop_after=13)


@pytest.mark.slow
def test_ddp_two_gloo_processes_end_with_identical_weights(tmp_path, mnist_shards):
    out = tmp_path / "ranks"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(tmp_path / "run"),
        str(mnist_shards),
        "--steps",
        "12",
        "--rank-out",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env(), timeout=600)
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    init = tiny_generator(TokenShards(mnist_shards)).state_dict()
    assert all(not torch.equal(init[k], r0[k]) for k in init if k.endswith("wqkv.weight"))  # and they did train
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/argen-pwned",))


def test_trainer_state_refuses_pickled_code(tmp_path, mnist_shards):
    shards = TokenShards(mnist_shards)
    model = tiny_generator(shards)
    train(GeneratorTask(model), shards, TrainConfig(steps=2, batch_size=16, save_every=1), tmp_path, progress=False)
    ckpt = checkpoint.latest_checkpoint(tmp_path)
    with open(ckpt / checkpoint.STATE_NAME, "wb") as f:
        pickle.dump({"step": Payload()}, f)
    if os.path.exists("/tmp/argen-pwned"):
        os.unlink("/tmp/argen-pwned")
    with pytest.raises(CheckpointError, match="possibly code") as e:
        checkpoint.load_checkpoint(ckpt, model)
    assert not os.path.exists("/tmp/argen-pwned")
    # torch's advice (retry with weights_only=False: run the payload) must never reach the user.
    assert "weights_only" not in str(e.value) and "weights only" not in str(e.value).lower()
    torch.save({"step": Payload()}, ckpt / checkpoint.STATE_NAME)  # the same payload inside torch's zip format
    with pytest.raises(CheckpointError, match="possibly code"):
        config = TrainConfig(steps=4, batch_size=16, save_every=1)
        train(GeneratorTask(model), shards, config, tmp_path, resume=True, progress=False)
    assert not os.path.exists("/tmp/argen-pwned")


def test_resume_with_a_different_config_is_refused(tmp_path, mnist_shards):
    shards = TokenShards(mnist_shards)
    train(
        GeneratorTask(tiny_generator(shards)),
        shards,
        TrainConfig(steps=2, batch_size=16, save_every=1),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="config differs"):
        train(
            GeneratorTask(tiny_generator(shards)),
            shards,
            TrainConfig(steps=4, batch_size=16, lr=1.0),
            tmp_path,
            resume=True,
            progress=False,
        )


def torchrun(*args: str, ranks: int = 2, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(WORKER)]
    if wait:
        return subprocess.run([*cmd, *args], env=env(), timeout=600, capture_output=True, text=True)
    return subprocess.Popen([*cmd, *args], env=env(), start_new_session=True)  # its own group: kill every rank


def finished(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# FSDP2 and DDP compute the same averaged gradients; they may differ only in the order of float32 reductions
# (reduce-scatter of flat shards vs one all-reduce). Measured on 2 gloo ranks: 0.0 (bit-identical) after 12
# AdamW steps; the bound leaves room for backends that reduce in another order.
FSDP_VS_DDP_ATOL = 1e-5


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_ddp(tmp_path, mnist_shards):
    for mode in ("ddp", "fsdp"):
        finished(torchrun(str(tmp_path / mode), str(mnist_shards), "--steps", "12", "--parallel", mode))
    ddp, fsdp = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp" / "final")
    assert ddp.keys() == fsdp.keys()
    worst = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    assert worst <= FSDP_VS_DDP_ATOL, f"FSDP2 and DDP weights differ by up to {worst:.2e}"
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000012" / "sharded" / ".metadata").is_file()


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_equals_uninterrupted_run_and_other_rank_counts_are_refused(tmp_path, mnist_shards):
    common = ("--steps", "15", "--parallel", "fsdp", "--grad-accum", "2", "--activation-checkpointing")
    finished(torchrun(str(tmp_path / "straight"), str(mnist_shards), *common))
    proc = torchrun(str(tmp_path / "killed"), str(mnist_shards), *common, "--sleep", "0.2", wait=False)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000005"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    one_rank = torchrun(str(tmp_path / "killed"), str(mnist_shards), *common, "--resume", ranks=1)
    assert one_rank.returncode != 0 and "world_size (checkpoint 2, now 1)" in one_rank.stderr
    finished(torchrun(str(tmp_path / "killed"), str(mnist_shards), *common, "--resume"))
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed FSDP weights differ"


def test_gradient_accumulation_matches_one_big_batch_and_precisions_train(tmp_path, mnist_shards):
    shards = TokenShards(mnist_shards)
    final = {}
    for accum in (1, 2):
        model = tiny_generator(shards)
        model.config.class_dropout = 0.0  # no per-micro-batch randomness: the two runs see the same sums
        config = TrainConfig(steps=3, batch_size=16, ema_decay=0, save_every=0, grad_accum=accum)
        train(GeneratorTask(model), shards, config, tmp_path / f"accum{accum}", progress=False)
        final[accum] = model.state_dict()
    assert all(torch.allclose(final[1][k], final[2][k], atol=1e-5) for k in final[1])
    for precision in ("bf16", "fp16"):
        config = TrainConfig(steps=2, batch_size=16, ema_decay=0, save_every=1, precision=precision)
        result = train(GeneratorTask(tiny_generator(shards)), shards, config, tmp_path / precision, progress=False)
        assert result.skipped_steps <= 1 and (tmp_path / precision / "final" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
