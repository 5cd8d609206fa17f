"""`argen bench`: sampling and training speed, measured the same way for every checkpoint and setting.

Reported per setting and batch size: NFE (sequential forward passes of the generator per batch), seconds per
image and images/s (median, min and max over repeats, after a warm-up), peak memory above the baseline, and
achieved FLOP/s as a share of the measured matmul peak of the device the model runs on, in its dtype (GPU timers
are read after synchronising the device). Several settings are measured
interleaved (A, B, A, B, ...) so that machine load affects them alike, and compared as ratios.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from argen.models.interface import Condition, DecodeState, Prediction
from argen.models.layers import rows_as_given
from argen.pipeline import ARPipeline
from argen.sampling.config import Speculative
from argen.sampling.decode import generate, seeded_generators
from argen.sampling.speculative import SpeculativeStats


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer read after it measures the work and not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak_flops(
    n: int = 1024, repeats: int = 10, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of an n x n matmul on `device` in `dtype` (CPU: with the current thread count)."""
    n = n if torch.device(device).type == "cpu" else max(n, 8192)  # a GPU needs a large matmul to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class PeakRSS:
    """Peak memory during a run: the process's resident set on CPU (sampled every 2 ms, so it includes the
    interpreter and the weights), the allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakRSS:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


class CountingGenerator:
    """Wraps a generator to count its sequential forward passes (NFE): every `predict`, whoever calls it (the
    plain loop, speculative verification, parallel rows)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        self.calls += 1
        return self.model.predict(state, positions)


@dataclass
class SpeedResult:
    setting: str
    batch_size: int
    nfe: int
    seconds_per_image: float
    seconds_per_image_min: float
    seconds_per_image_max: float
    images_per_second: float
    peak_memory_mb: float
    flops_per_image: float
    peak_ratio: float  # achieved FLOP/s / matmul peak
    times: list[float] = field(default_factory=list)
    acceptance: float | None = None  # speculative settings: share of drafted tokens the target kept


def _one_run(pipe: ARPipeline, labels: torch.Tensor, seed: int, sampler: dict) -> tuple[float, int, float | None]:
    """One timed generation + decode -> (seconds, target forward passes, speculative acceptance rate or None)."""
    counter = CountingGenerator(pipe.generator)
    config = pipe.config(**sampler)
    speculative = isinstance(config.acceleration, Speculative)
    stats = SpeculativeStats()
    synchronize(pipe.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = generate(
            counter,
            labels,
            config,
            seeded_generators(range(seed, seed + len(labels)), device=pipe.device),
            draft_model=pipe.draft,
            stats=stats,
            codebook=pipe.codebook if speculative and config.acceleration.relax_k else None,
            guide_model=pipe.guide,
        )
        pipe.tokenizer.decode(ids)
    synchronize(pipe.device)
    acceptance = stats.acceptance_rate if speculative else None
    return time.perf_counter() - t0, counter.calls, acceptance


def _flops(pipe: ARPipeline, labels: torch.Tensor, sampler: dict) -> float:
    # the method's own FLOPs: not the zero rows that keep a CPU's few-row products batch-invariant
    with rows_as_given(), FlopCounterMode(display=False) as counter:
        _one_run(pipe, labels, 0, sampler)
    return float(counter.get_total_flops())


def bench_sampling(
    runs: dict[str, tuple[ARPipeline, dict]],
    batch_sizes: list[int],
    repeats: int = 5,
    peak: float | None = None,
    progress=None,
) -> list[SpeedResult]:
    """Time every (pipeline, sampler overrides) run at every batch size, interleaving the runs within each repeat
    so that machine load affects them alike. `peak`: the matmul peak of the runs' device; if None, each run's is
    measured on its own device in its own weights' dtype (an fp32 and a bf16 run are each held to their own)."""
    peaks: dict[tuple[torch.device, torch.dtype], float] = {}

    def peak_of(pipe: ARPipeline) -> float:
        if peak is not None:
            return peak
        key = (pipe.device, next(pipe.generator.parameters()).dtype)
        if key not in peaks:
            peaks[key] = matmul_peak_flops(device=key[0], dtype=key[1])
        return peaks[key]

    results = []
    for bs in batch_sizes:
        times = {name: [] for name in runs}
        accepted = {name: [] for name in runs}
        nfe, mem, flops, labels = {}, {}, {}, {}
        for name, (pipe, sampler) in runs.items():
            labels[name] = (torch.arange(bs) % pipe.generator.num_classes).to(pipe.device)
            _one_run(pipe, labels[name], 0, sampler)  # warm-up
            flops[name] = _flops(pipe, labels[name], sampler)
            with PeakRSS(pipe.device) as watch:
                _, nfe[name], _ = _one_run(pipe, labels[name], 0, sampler)
            mem[name] = watch.megabytes
        for r in range(repeats):
            for name, (pipe, sampler) in runs.items():
                seconds, _, acceptance = _one_run(pipe, labels[name], 1000 * (r + 1), sampler)
                times[name].append(seconds / bs)
                if acceptance is not None:
                    accepted[name].append(acceptance)
                if progress is not None:
                    progress.update(1)
        for name in runs:
            t = times[name]
            med = statistics.median(t)
            results.append(
                SpeedResult(
                    name,
                    bs,
                    nfe[name],
                    med,
                    min(t),
                    max(t),
                    1 / med,
                    mem[name],
                    flops[name] / bs,
                    flops[name] / bs / med / peak_of(runs[name][0]),
                    t,
                    statistics.mean(accepted[name]) if accepted[name] else None,
                )
            )
    return results


def bench_training(pipe: ARPipeline, batch_size: int = 32, steps: int = 10, peak: float | None = None) -> dict:
    """Tokens/s of teacher-forced training steps (forward + backward + AdamW) on random token sequences."""
    peak = peak or matmul_peak_flops(device=pipe.device, dtype=next(pipe.generator.parameters()).dtype)
    model = pipe.generator
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch_size, model.seq_len), generator=g).to(pipe.device)
    condition = Condition.classes(torch.randint(0, model.num_classes, (batch_size,), generator=g).to(pipe.device))

    def step() -> None:
        model.loss(tokens, condition).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step()  # warm-up
        with FlopCounterMode(display=False) as counter:
            step()
        times = []
        for _ in range(steps):
            synchronize(pipe.device)
            t0 = time.perf_counter()
            step()
            synchronize(pipe.device)
            times.append(time.perf_counter() - t0)
    finally:
        model.load_state_dict(state)
        model.eval()
    med = statistics.median(times)
    return {
        "batch_size": batch_size,
        "seconds_per_step": med,
        "tokens_per_second": batch_size * model.seq_len / med,
        "flops_per_step": float(counter.get_total_flops()),
        "peak_ratio": counter.get_total_flops() / med / peak,
    }
