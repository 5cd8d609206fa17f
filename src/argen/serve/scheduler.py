"""The step-level scheduler: requests join and leave running batches between steps, as vLLM does for text.

Each request keeps what makes its images its own: per-sample `torch.Generator`s (image i draws from seed + i, as
`ARPipeline` does), its own guidance rows and schedule, temperature and top-k/p. What requests share is the
forward pass: requests of the same model and order options whose states stand at the same step of a
position-aligned order (raster: the same token; next-scale: the same scale) are a *cohort*, stacked row-wise
into one DecodeState (`batching.stack`), so one `predict` serves all of them. Guidance, logit processing and the
draw then run per request on its own rows, with its own generators, and one `advance` commits every row.

Between steps (one iteration of `_loop`), the scheduler
- retires finished, cancelled and timed-out requests (their rows are taken out of the stacked state),
- admits waiting requests while the running rows stay under `max_rows` (a new request starts at step 0 and
  joins a cohort still at step 0),
- merges cohorts that stand at the same step, and runs one step of every cohort.

Rows at *different* steps never share a pass: next-scale steps have different map sizes, and raster's mixed-
position pass takes a different kernel path (masked per-row attention) than a request run alone, which would
give up bit-identity. Orders whose positions come from a random policy (masked, random-order), and states whose
cache is not stackable (a ScaleKV budget), run as cohorts of one: still interleaved step by step, never stacked.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from argen.models.interface import Condition, DecodeState
from argen.pipeline import ARPipeline
from argen.sampling import guidance
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import seeded_generators
from argen.sampling.logits import check_finite, draw, process
from argen.sampling.positions import PositionPolicy, policy_class
from argen.serve import batching

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 503 + Retry-After)."""


class Draining(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass
class Request:
    """One generation request: n = len(labels) images of one model, image i seeded with seed + i."""

    model: str
    labels: list[int]  # class ids
    seed: int
    config: SamplerConfig
    previews: bool = False  # decode a preview after every step


@dataclass
class Event:
    kind: str  # "preview", "done" or "error"
    step: int = 0
    num_steps: int = 0
    images: torch.Tensor | None = None  # (n, C, H, W) in [-1, 1], on the CPU
    tokens: torch.Tensor | None = None  # (n, L) with "done"
    message: str = ""


@dataclass
class Job:
    """A request in flight: its sampling state and where its events go (`on_event`, called from the scheduler
    thread)."""

    id: int
    request: Request
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # set at admission
    pipeline: ARPipeline | None = None
    generators: list[torch.Generator] | None = None
    schedule: guidance.Schedule | None = None
    policy: PositionPolicy | None = None

    @property
    def n(self) -> int:
        return len(self.request.labels)

    @property
    def rows(self) -> int:
        """Rows of the decode state: n, or 2n under guidance (conditional rows, then the unconditional ones)."""
        return self.n * (2 if self.schedule is not None else 1)

    def cancel(self) -> None:
        """Stop this request at the next step boundary (the client went away, or its time ran out)."""
        self.cancelled = True


@dataclass
class Cohort:
    """Requests whose rows are stacked into one state, all at the same step."""

    key: tuple
    jobs: list[Job]
    state: DecodeState


@dataclass
class Stats:
    """What /metrics reports; counters only grow."""

    forward_passes: int = 0
    rows_stepped: int = 0  # rows summed over forward passes: rows / passes = mean rows per pass
    images: int = 0
    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    done_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    # the latency histogram, cumulative as Prometheus wants it: requests done within each bound (s)
    bounds: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    within: list[int] = field(default_factory=lambda: [0] * 9)
    latency_sum: float = 0.0

    def record(self, seconds: float, images: int) -> None:
        self.requests += 1
        self.images += images
        self.latencies.append(seconds)
        self.done_times.append((time.monotonic(), images))
        self.latency_sum += seconds
        for i, bound in enumerate(self.bounds):
            self.within[i] += seconds <= bound

    def images_per_second(self, window: float = 60.0) -> float:
        """Images finished per second over the last `window` seconds."""
        since = time.monotonic() - window
        return sum(n for t, n in list(self.done_times) if t >= since) / window


class Scheduler:
    """Runs the models of `pipelines` (name -> ARPipeline) in one background thread.

    max_rows: decode-state rows running at once (guided images count twice); max_queue: requests waiting beyond
    them, past which `submit` raises QueueFull; batching=False runs one request at a time (the baseline).
    max_cohorts: cohorts running at once. Requests arriving one by one would otherwise each open a cohort of
    their own at step 0 and never share a pass; past this bound they wait and start together (the next cohort
    at step 0 takes every waiting request that fits), which keeps passes full under load.
    """

    def __init__(
        self,
        pipelines: dict[str, ARPipeline],
        max_rows: int = 64,
        max_queue: int = 64,
        batching: bool = True,
        max_cohorts: int = 2,
    ):
        self.pipelines = pipelines
        self.max_rows, self.max_queue, self.batching = max_rows, max_queue, batching
        self.max_cohorts = max_cohorts
        self.waiting: collections.deque[Job] = collections.deque()
        self.cohorts: list[Cohort] = []
        self.stats = Stats()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- the caller's side (any thread) ---

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="argen-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Job:
        with self._wake:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")
            job = Job(next(self._ids), request, on_event)
            self.waiting.append(job)
            self._wake.notify()
        return job

    @property
    def running_rows(self) -> int:
        return sum(len(c.state.tokens) for c in self.cohorts)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.cohorts)

    def stop(self, timeout: float = 4.0) -> None:
        """Take no new requests, let those in flight finish for up to `timeout` s, cancel the rest, stop."""
        with self._wake:
            self._draining = True
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._wake:
            for job in [*self.waiting, *(j for c in self.cohorts for j in c.jobs)]:
                job.cancel()
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # --- the scheduler thread ---

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.busy:
                    self._wake.wait()
                if self._stopped:
                    self._fail_all("the server stopped before this request finished")
                    return
            self.iterate()

    def iterate(self) -> None:
        """One round between steps: retire, admit, merge, then one step of every cohort. The thread calls it in a
        loop; tests call it directly to place joins and departures at chosen steps."""
        self._retire_cancelled()
        self._admit()
        self._merge()
        for cohort in list(self.cohorts):
            self._step(cohort)

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if not job.cancelled:
                    rows = job.n * (2 if job.request.config.schedule() is not None else 1)
                    full = self.running_rows + rows > self.max_rows and self.cohorts
                    joinable = any(c.state.step == 0 and c.key[-1] is None for c in self.cohorts)
                    crowded = len(self.cohorts) >= self.max_cohorts and not joinable
                    if full or crowded or (not self.batching and self.cohorts):
                        return
                self.waiting.popleft()
            if job.cancelled:
                self.stats.cancelled += 1
                continue
            try:
                self._start(job)
            except Exception as error:  # a request that cannot start fails alone
                log.exception("request %d failed to start", job.id)
                self._finish_error(job, f"{type(error).__name__}: {error}")

    def _start(self, job: Job) -> None:
        request = job.request
        pipe = self.pipelines[request.model]
        model, config = pipe.generator, request.config
        job.pipeline = pipe
        job.generators = seeded_generators([request.seed + i for i in range(job.n)])
        job.schedule = config.schedule()
        options = config.options_for(model.order)
        labels = Condition.classes(torch.tensor(request.labels, device=pipe.device))
        rows = guidance.with_null_rows(labels) if job.schedule is not None else labels
        state = model.start(rows, options)
        job.policy = policy_class(model.order.policy)(model, options, job.n, job.generators, None)
        job.policy.begin(state)
        alone = not (model.order.policy == "next" and batching.stackable(state))
        key = (request.model, options, job.id if alone else None)
        for cohort in self.cohorts:
            if cohort.key == key and cohort.state.step == 0:
                cohort.state = batching.stack([cohort.state, state])
                cohort.jobs.append(job)
                return
        self.cohorts.append(Cohort(key, [job], state))

    def _merge(self) -> None:
        """Cohorts of one key that stand at the same step become one."""
        merged: dict[tuple, Cohort] = {}
        for cohort in self.cohorts:
            slot = (cohort.key, cohort.state.step)
            if slot in merged and cohort.key[-1] is None:
                first = merged[slot]
                first.state = batching.stack([first.state, cohort.state])
                first.jobs.extend(cohort.jobs)
            else:
                merged[slot] = cohort
        self.cohorts = list(merged.values())

    def _retire_cancelled(self) -> None:
        for cohort in list(self.cohorts):
            gone = [job for job in cohort.jobs if job.cancelled]
            if not gone:
                continue
            self.stats.cancelled += len(gone)
            keep, offset, rows = [], 0, []
            for job in cohort.jobs:
                if not job.cancelled:
                    keep.append(job)
                    rows.extend(range(offset, offset + job.rows))
                offset += job.rows
            if not keep:
                self.cohorts.remove(cohort)
                continue
            cohort.state = batching.take(cohort.state, torch.tensor(rows, device=cohort.state.tokens.device))
            cohort.jobs = keep

    def _step(self, cohort: Cohort) -> None:
        """One step of every request in the cohort: one forward pass, then each request's own sampling."""
        state, model = cohort.state, cohort.jobs[0].pipeline.generator
        try:
            with torch.no_grad():
                self._decode_step(cohort, state, model)
        except Exception as error:  # a broken step fails the requests in it, not the server
            log.exception("a step of %d request(s) failed", len(cohort.jobs))
            self.cohorts.remove(cohort)
            for job in cohort.jobs:
                self._finish_error(job, f"{type(error).__name__}: {error}")
            return
        self.stats.forward_passes += 1
        self.stats.rows_stepped += len(state.tokens)
        if state.done:
            self.cohorts.remove(cohort)
            for job, tokens in zip(cohort.jobs, self._job_tokens(cohort), strict=True):
                self._finish(job, tokens)
        else:
            for job, (tokens, filled) in zip(cohort.jobs, self._job_rows(cohort), strict=True):
                if job.request.previews and not job.cancelled:
                    with torch.no_grad():
                        preview = job.pipeline.tokenizer.decode_partial(tokens, filled).clamp(-1, 1).cpu()
                    job.on_event(Event("preview", state.step, state.num_steps, preview))

    def _decode_step(self, cohort: Cohort, state: DecodeState, model: Any) -> None:
        # as argen.sampling.decode.decode_steps, with the sampling done request by request
        asked = cohort.jobs[0].policy.positions(state) if len(cohort.jobs) == 1 else None
        job0 = cohort.jobs[0]
        copies = 2 if job0.schedule is not None else 1
        prediction = model.predict(state, None if asked is None else asked.repeat(copies, 1))
        check_finite(prediction.logits, f"logits at step {state.step}")
        all_positions, all_values, offset = [], [], 0
        for job in cohort.jobs:
            config, copies = job.request.config, 2 if job.schedule is not None else 1
            logits = prediction.logits[offset : offset + job.rows]
            if job.schedule is not None:
                logits = guidance.guide(logits, job.schedule(state.progress))
            logits = process(logits, config.temperature, config.top_k, config.top_p)
            values = draw(logits, job.generators, config.greedy)
            positions = prediction.positions[offset : offset + job.n]
            positions, values = job.policy.select(state, positions, logits, values)
            all_positions.append(positions.repeat(copies, 1))
            all_values.append(values.repeat(copies, 1))
            offset += job.rows
        model.advance(state, torch.cat(all_positions), torch.cat(all_values))

    def _job_rows(self, cohort: Cohort):
        """Each request's conditional rows: (tokens, filled), (n, L) each."""
        offset = 0
        for job in cohort.jobs:
            yield cohort.state.tokens[offset : offset + job.n], cohort.state.filled[offset : offset + job.n]
            offset += job.rows

    def _job_tokens(self, cohort: Cohort) -> list[torch.Tensor]:
        return [tokens.clone() for tokens, _ in self._job_rows(cohort)]

    def _finish(self, job: Job, tokens: torch.Tensor) -> None:
        if job.cancelled:
            self.stats.cancelled += 1
            return
        try:
            with torch.no_grad():  # the request's own images, decoded alone: as ARPipeline decodes them
                images = job.pipeline.tokenizer.decode(tokens).clamp(-1, 1).cpu()
        except Exception as error:
            log.exception("decoding request %d failed", job.id)
            self._finish_error(job, f"{type(error).__name__}: {error}")
            return
        self.stats.record(time.monotonic() - job.submitted, job.n)
        job.on_event(Event("done", images=images, tokens=tokens.cpu()))

    def _finish_error(self, job: Job, message: str) -> None:
        self.stats.failed += 1
        job.on_event(Event("error", message=message))

    def _fail_all(self, message: str) -> None:
        for job in [*self.waiting, *(j for c in self.cohorts for j in c.jobs)]:
            if not job.cancelled:
                job.on_event(Event("error", message=message))
        self.waiting.clear()
        self.cohorts.clear()
