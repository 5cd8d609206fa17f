"""The step-level scheduler: requests join and leave running batches between steps, as vLLM does for text.

Each request keeps what makes its images its own: per-sample `torch.Generator`s on the model's device (image i
draws from seed + i, as `ARPipeline` does), its own guidance rows, its own step and schedule, its policy (MaskGIT's
confidence, RandAR's permutation, MAR's order), temperature and top-k/p. What requests share is the forward pass:
requests of the same model and order options are a *batch*, their rows stacked row-wise into one DecodeState
(`batching.stack`), so one `predict` serves all of them. The policy's positions and choice run per request on a
view of its own rows at its own step (`batching.rows`); the values come from the order's one value sampler
(`argen.sampling.values`, as in `decode_steps`: logits guided, processed and drawn, or MAR's diffusion head run),
called once for the requests that agree on its settings, with each request's own guidance scales and each image's
own generator. Under autoguidance (guide_scale) a batch also holds its requests' rows of the pipeline's guide model
(n per request, one state stacked the same way), predicted at the same positions and advanced with the same values.

Between steps (one iteration of `_loop`), the scheduler
- retires finished, cancelled and timed-out requests (their rows are taken out of the stacked state),
- admits waiting requests while the running rows stay under `max_rows`,
- merges batches that may share a pass, and runs one step of every batch.

Where an arrival joins depends on the order (`OrderSpec.row_steps`):
- raster, masked, random-order and MAR read each row's progress from the state (raster's next position is the
  length of the row's filled prefix; masked predicts the whole canvas; random-order is told each row's positions
  and caches cls in each row's own first pass; MAR's encoder runs the rows holding equally many known latents
  together), and a row attends over the whole cache with a key mask, so its prediction does not depend on how far
  its neighbours have got: an arrival joins the running batch at once, at its own step 0, beside rows at any
  step. A request asking fewer positions than its neighbours (random-order with `steps`, MAR: the count follows
  each request's own step) is padded with its first and draws only its own.
- next-scale (a map of another size at every step) shares a pass at the same step only: an arrival opens a batch
  at step 0 (at most `max_batches` per model run at once, so arrivals gather into full batches) and batches that
  meet at a step merge.
States whose cache is not stackable (a ScaleKV budget) run as batches of one.
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

from argen.models.interface import Condition, DecodeState, Prediction
from argen.pipeline import ARPipeline
from argen.sampling import guidance
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import check_guide
from argen.sampling.positions import PositionPolicy, policy_class
from argen.sampling.values import Drawn, StepRows, value_sampler
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
    guide_schedule: guidance.Schedule | None = None  # autoguidance: the guide model runs n rows beside
    policy: PositionPolicy | None = None
    options: Any = None  # the order's own options (its `options_class`)
    step: int = 0  # the request's own step, whatever the batch's other rows stand at
    num_steps: int = 0

    @property
    def n(self) -> int:
        return len(self.request.labels)

    @property
    def rows(self) -> int:
        """Rows of the decode state: n, or 2n under guidance (conditional rows, then the unconditional ones)."""
        return self.n * (2 if self.schedule is not None else 1)

    @property
    def cost(self) -> int:
        """Rows this request runs through a model per step: its decode-state rows, and n more under autoguidance."""
        return self.rows + (self.n if self.guide_schedule is not None else 0)

    def cancel(self) -> None:
        """Stop this request at the next step boundary (the client went away, or its time ran out)."""
        self.cancelled = True


@dataclass
class Batch:
    """Requests whose rows are stacked into one state and share every forward pass, in `jobs` order (each job's
    rows one contiguous block). `mixed`: the order reads each row's progress from the state (`row_steps`), so the
    jobs may stand at different steps; otherwise they all stand at the same step. `guide`: the guide model's state
    under autoguidance (every job's n conditional rows, in `jobs` order; the key keeps guided and unguided apart)."""

    key: tuple
    jobs: list[Job]
    state: DecodeState
    mixed: bool
    guide: DecodeState | None = None

    @property
    def step(self) -> int:
        """The step of an aligned batch (its first job's step when mixed)."""
        return self.jobs[0].step

    def spans(self):
        """(job, lo, hi) for every job: where its rows sit in the stacked state."""
        lo = 0
        for job in self.jobs:
            yield job, lo, lo + job.rows
            lo += job.rows

    def guide_spans(self):
        """(job, lo, hi) for every job: where its rows sit in the guide model's state."""
        lo = 0
        for job in self.jobs:
            yield job, lo, lo + job.n
            lo += job.n

    @property
    def rows(self) -> int:
        return len(self.state.tokens) + (0 if self.guide is None else len(self.guide.tokens))


@dataclass
class Stats:
    """What /metrics reports; counters only grow."""

    forward_passes: int = 0
    rows_stepped: int = 0  # rows summed over forward passes: rows / passes = mean rows per pass
    mixed_passes: int = 0  # passes whose rows stood at different steps (requests that joined mid-way)
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

    max_rows: rows running through a model at once (an image counts twice under classifier-free guidance, once more
    under autoguidance); max_queue: requests waiting beyond
    them, past which `submit` raises QueueFull; batching=False runs one request at a time (the baseline).
    max_batches: same-step batches running at once, per model. An order with `row_steps` (all shipped ones but
    next-scale) keeps one batch per model and options, which an arrival joins at once, whatever step its rows stand
    at. The others share a pass only at the same step, so an arrival opens a batch at step 0; past this bound such
    arrivals wait and start together (the next batch at step 0 takes every waiting request of the model that
    fits), which keeps passes full, while requests of other models pass them.
    """

    def __init__(
        self,
        pipelines: dict[str, ARPipeline],
        max_rows: int = 64,
        max_queue: int = 64,
        batching: bool = True,
        max_batches: int = 2,
    ):
        self.pipelines = pipelines
        self.max_rows, self.max_queue, self.batching = max_rows, max_queue, batching
        self.max_batches = max_batches
        self.waiting: collections.deque[Job] = collections.deque()
        self.batches: list[Batch] = []
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
            self.check_room()
            job = Job(next(self._ids), request, on_event)
            self.waiting.append(job)
            self._wake.notify()
        return job

    def check_room(self) -> None:
        """Raise QueueFull when the queue is at its bound: the cheap check a server makes before parsing a request
        further, so that refusing one under overload costs next to nothing."""
        if len(self.waiting) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")

    @property
    def running_rows(self) -> int:
        return sum(b.rows for b in self.batches)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.batches)

    def stop(self, timeout: float = 4.0) -> None:
        """Take no new requests, let those in flight finish for up to `timeout` s, cancel the rest, stop."""
        with self._wake:
            self._draining = True
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._wake:
            for job in [*self.waiting, *(j for b in self.batches for j in b.jobs)]:
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
        """One round between steps: retire, admit, merge, then one step of every batch. The thread calls it in a
        loop; tests call it directly to place joins and departures at chosen steps."""
        self._retire_cancelled()
        self._admit()
        self._merge()
        for batch in list(self.batches):
            self._step(batch)

    def _admit(self) -> None:
        """Start waiting requests in arrival order while rows are free. A request held back by its model's batch
        bound alone (a same-step order) lets later requests of other models pass; those of its own model wait
        behind it."""
        held: set[str] = set()  # models whose first waiting request waits for a batch
        index = 0
        while True:
            with self._wake:
                if index >= len(self.waiting):
                    return
                job = self.waiting[index]
                if not job.cancelled:
                    room = self._room_for(job)
                    if room is None:  # no rows: everything behind waits too
                        return
                    if not room or job.request.model in held:
                        held.add(job.request.model)
                        index += 1
                        continue
                del self.waiting[index]
            if job.cancelled:
                self.stats.cancelled += 1
                continue
            try:
                self._start(job)
            except Exception as error:  # a request that cannot start fails alone
                log.exception("request %d failed to start", job.id)
                self._finish_error(job, f"{type(error).__name__}: {error}")

    def _room_for(self, job: Job) -> bool | None:
        """True: the request may start now; False: rows are free but its model's batch bound holds it back; None:
        not enough free rows (or one request at a time without batching)."""
        if not self.batching:
            return None if self.batches else True
        config = job.request.config
        rows = job.n * (2 if config.schedule() is not None else 1) + (job.n if config.guide_schedule() else 0)
        if self.batches and self.running_rows + rows > self.max_rows:
            return None
        try:
            key = self._key(job.request)
        except Exception:  # a bad setting: let it start (and fail) now rather than wait
            return True
        if self.pipelines[job.request.model].generator.order.row_steps:
            return True  # joins its batch now, or opens it
        joinable = any(b.key == key and b.step == 0 for b in self.batches)
        model = job.request.model  # the bound is per model: one order's batches do not hold back another's
        return joinable or sum(not b.mixed and b.key[0] == model for b in self.batches) < self.max_batches

    def _key(self, request: Request) -> tuple:
        """What two requests must share to share a pass: the model, the order's options and whether a guide model
        runs beside."""
        config = request.config
        order = self.pipelines[request.model].generator.order
        return (request.model, config.options_for(order), config.guide_schedule() is not None)

    def _start(self, job: Job) -> None:
        request = job.request
        pipe = self.pipelines[request.model]
        model, config = pipe.generator, request.config
        job.pipeline = pipe
        # as ARPipeline makes them: on the model's device, whose draws for a seed differ from the CPU's
        job.generators = pipe.generators(job.n, request.seed)
        job.schedule = config.schedule()
        job.guide_schedule = config.guide_schedule()
        options = job.options = config.options_for(model.order)
        labels = Condition.classes(torch.tensor(request.labels, device=pipe.device))
        rows = guidance.with_null_rows(labels) if job.schedule is not None else labels
        state = model.start(rows, options)
        guide = None
        if job.guide_schedule is not None:
            check_guide(model, pipe.guide)
            guide = pipe.guide.start(labels, options)
        job.policy = policy_class(model.order.policy)(model, options, job.n, job.generators, None)
        job.policy.begin(state)
        if guide is not None:  # from the canvas the generator starts on, as decode_steps does
            guide.tokens.copy_(state.tokens[: job.n])
            guide.filled.copy_(state.filled[: job.n])
        job.num_steps = state.num_steps
        shares = batching.stackable(state) and (guide is None or batching.stackable(guide))
        key = self._key(request) if shares else (request.model, options, job.id)
        # a batch of its own until `_merge` stacks it into the running one: one copy of the running rows per
        # step however many requests join at that step
        self.batches.append(Batch(key, [job], state, shares and model.order.row_steps, guide))

    def _merge(self) -> None:
        """Batches of one key become one where the order allows: any two of a `row_steps` order, others at the
        same step."""
        groups: dict[tuple, list[Batch]] = {}
        for batch in self.batches:
            groups.setdefault((batch.key,) if batch.mixed else (batch.key, batch.step), []).append(batch)
        self.batches = []
        for first, *others in groups.values():
            if others:
                first.state = batching.stack([first.state, *(b.state for b in others)], aligned=not first.mixed)
                if first.guide is not None:
                    first.guide = batching.stack([first.guide, *(b.guide for b in others)], aligned=not first.mixed)
                first.jobs = [*first.jobs, *(job for b in others for job in b.jobs)]
            self.batches.append(first)

    def _retire_cancelled(self) -> None:
        for batch in list(self.batches):
            gone = [job for job in batch.jobs if job.cancelled]
            if gone:
                self.stats.cancelled += len(gone)
                self._drop(batch, gone)

    def _drop(self, batch: Batch, gone: list[Job]) -> None:
        """Take the rows of `gone` out of the batch (the batch ends with its last request)."""
        keep = [(job, lo, hi) for job, lo, hi in batch.spans() if job not in gone]
        if not keep:
            self.batches.remove(batch)
            return
        rows = torch.cat([torch.arange(lo, hi) for _, lo, hi in keep]).to(batch.state.tokens.device)
        batch.state = batching.take(batch.state, rows)
        if batch.guide is not None:
            kept = [torch.arange(lo, hi) for job, lo, hi in batch.guide_spans() if job not in gone]
            batch.guide = batching.take(batch.guide, torch.cat(kept).to(batch.guide.tokens.device))
        batch.jobs = [job for job, _, _ in keep]

    def _step(self, batch: Batch) -> None:
        """One step of every request in the batch: one forward pass, then each request's own sampling."""
        state, model = batch.state, batch.jobs[0].pipeline.generator
        steps = {job.step for job in batch.jobs}
        try:
            with torch.no_grad():
                self._decode_step(batch, model)
        except Exception as error:  # a broken step fails the requests in it, not the server
            log.exception("a step of %d request(s) failed", len(batch.jobs))
            self.batches.remove(batch)
            for job in batch.jobs:
                self._finish_error(job, f"{type(error).__name__}: {error}")
            return
        self.stats.forward_passes += 1
        self.stats.rows_stepped += len(state.tokens)
        self.stats.mixed_passes += len(steps) > 1
        done = []
        for job, lo, _ in batch.spans():
            tokens, filled = state.tokens[lo : lo + job.n], state.filled[lo : lo + job.n]
            if job.step >= job.num_steps:
                done.append(job)
                self._finish(job, tokens.clone())
            elif job.request.previews and not job.cancelled:
                with torch.no_grad():
                    preview = job.pipeline.tokenizer.decode_partial(tokens, filled).clamp(-1, 1).cpu()
                job.on_event(Event("preview", job.step, job.num_steps, preview))
        if done:
            self._drop(batch, done)

    def _decode_step(self, batch: Batch, model: Any) -> None:
        # as argen.sampling.decode.decode_steps, each request on a view of its own rows at its own step
        state = batch.state
        views = [(job, lo, batching.rows(state, lo, hi, job.step, job.num_steps)) for job, lo, hi in batch.spans()]
        asked = [job.policy.positions(view) for job, _, view in views]
        positions = guide_positions = None
        if any(a is not None for a in asked):  # every request of the batch asks (one order)
            # a request asking fewer positions than its neighbours (random-order's count follows its own step)
            # repeats its first one; the extra predictions are dropped before its draw
            width = max(a.shape[1] for a in asked)
            pad = [torch.cat([a, a[:, :1].expand(-1, width - a.shape[1])], dim=1) for a in asked]
            positions = torch.cat([a.repeat(job.rows // job.n, 1) for (job, _, _), a in zip(views, pad, strict=True)])
            guide_positions = torch.cat(pad)
        prediction = model.predict(state, positions)
        # (sum of n, k, ...): the guide model's conditional output (logits, or its head's z), in the jobs' order
        guide_out = None
        if batch.guide is not None:
            output = value_sampler(model.order).output
            guide_out = output(batch.jobs[0].pipeline.guide.predict(batch.guide, guide_positions))
            guide_out = guide_out.to(output(prediction).device)
        widths = [prediction.positions.shape[1] if a is None else a.shape[1] for a in asked]
        drawn = self._draw(model, state, views, prediction, widths, guide_out)
        chosen = []
        for (job, lo, view), own, k in zip(views, drawn, widths, strict=True):
            chosen.append(job.policy.select(view, prediction.positions[lo : lo + job.n, :k], own.logits, own.values))
            job.step += 1
        if batch.mixed and len({p.shape[1] for p, _ in chosen}) > 1:
            # ragged commits (the masked order's counts follow each request's own schedule): each request commits
            # its own rows (a row_steps order's advance reads only those)
            guides = batch.guide_spans() if batch.guide is not None else itertools.repeat(None)
            for (job, _, view), (positions, values), span in zip(views, chosen, guides, strict=False):
                copies = job.rows // job.n
                model.advance(view, positions.repeat(copies, 1), values.repeat(copies, *([1] * (values.dim() - 1))))
                if span is not None:
                    _, lo, hi = span
                    own = batching.rows(batch.guide, lo, hi, view.step, view.num_steps)
                    job.pipeline.guide.advance(own, positions, values)
        else:  # one commit for all rows: the order may keep batch-wide bookkeeping (next-scale's residual map)
            # each row's image among the batch's images (guidance's unconditional rows follow the conditional ones)
            firsts = itertools.accumulate((job.n for job, _, _ in views), initial=0)
            image = [
                first + row % job.n
                for first, (job, _, _) in zip(firsts, views, strict=False)
                for row in range(job.rows)
            ]
            image = torch.tensor(image, device=state.tokens.device)
            positions, values = torch.cat([p for p, _ in chosen]), torch.cat([v for _, v in chosen])
            model.advance(state, positions[image], values[image])
            if batch.guide is not None:  # the guide's rows are the images themselves
                batch.jobs[0].pipeline.guide.advance(batch.guide, positions, values)

    def _draw(
        self,
        model: Any,
        state: DecodeState,
        views,
        prediction: Prediction,
        widths: list[int],
        guide_out: torch.Tensor | None = None,
    ) -> list[Drawn]:
        """Each request's values of its n images at its own `widths` positions, through the order's one value
        sampler (`argen.sampling.values`: logits drawn, or the diffusion head run). Requests that agree on what the
        draw reads (the sampler's `key`), on guidance being on and, unless the sampler takes ragged widths, on the
        width share one call, with per-sample guidance scales at each request's own step and each image's own
        generator: every op is per row, so this is what each would get on its own. `guide_out`: the guide
        model's output, n rows per request in `views` order, under autoguidance."""
        sampler = value_sampler(model.order)
        groups: dict[tuple, list] = {}
        guide_lo = itertools.accumulate((job.n for job, _, _ in views), initial=0)
        for (job, lo, view), k, glo in zip(views, widths, guide_lo, strict=False):
            key = sampler.key(job.request.config, job.options)
            progress = job.policy.guidance_progress(view)
            scales = guide_scales = None
            if job.schedule is not None:
                scales = torch.tensor([job.schedule(float(t)) for t in progress])
            if job.guide_schedule is not None:
                guide_scales = torch.tensor([job.guide_schedule(float(t)) for t in progress])
            width = None if sampler.ragged else k
            groups.setdefault((key, scales is None, width), []).append((job, lo, glo, view, scales, guide_scales, k))
        out = {}
        for (_, unguided, _), members in groups.items():
            cond = torch.cat([torch.arange(lo, lo + job.n) for job, lo, *_ in members]).to(state.tokens.device)
            rows = cond
            if not unguided:  # the conditional rows, then the unconditional ones (guidance.with_null_rows)
                uncond = [torch.arange(lo + job.n, lo + 2 * job.n) for job, lo, *_ in members]
                rows = torch.cat([cond, torch.cat(uncond).to(cond.device)])
            first, _, _, view, *_ = members[0]  # the key: what the draw reads of config, options and step is theirs
            width = max(k for *_, k in members)
            step_rows = StepRows(
                # past a request's own width, its positions are padded with its first (`_decode_step`)
                _prediction_rows(prediction, rows, width),
                state.tokens[cond],
                state.filled[cond],
                None if unguided else torch.cat([m[4] for m in members]),
                [v.step for job, _, _, v, *_ in members for _ in range(job.n)],
                view.num_steps,
            )
            if guide_out is not None:  # a batch's jobs all run the guide or none does (the batch key)
                own = torch.cat([torch.arange(glo, glo + job.n) for job, _, glo, *_ in members])
                step_rows.guide = guide_out[own.to(guide_out.device), :width]
                step_rows.guide_scales = torch.cat([m[5] for m in members])
                step_rows.guide_model = first.pipeline.guide
            drawn = sampler.draw(
                model,
                step_rows,
                first.request.config,
                first.options,
                [g for job, *_ in members for g in job.generators],
            )
            offset = 0
            for job, *_, k in members:
                part = slice(offset, offset + job.n)
                logits = None if drawn.logits is None else drawn.logits[part, :k]
                out[job.id] = Drawn(drawn.values[part, :k], logits)
                offset += job.n
        return [out[job.id] for job, _, _ in views]

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
        for job in [*self.waiting, *(j for b in self.batches for j in b.jobs)]:
            if not job.cancelled:
                job.on_event(Event("error", message=message))
        self.waiting.clear()
        self.batches.clear()


def _prediction_rows(prediction: Prediction, rows: torch.Tensor, width: int) -> Prediction:
    """Some rows of a batch's prediction, at their first `width` positions."""

    def part(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[rows, :width]

    return Prediction(prediction.positions[rows, :width], logits=part(prediction.logits), z=part(prediction.z))
