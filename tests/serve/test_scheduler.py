"""The scheduler's contract: a request's images are bit-identical whether it ran alone or among strangers that
joined and left mid-way, for every shipped order; cancellation, bounds and per-request failures."""

import pytest
import torch

from argen.pipeline import ARPipeline
from argen.serve.scheduler import QueueFull, Request, Scheduler

ORDERS = ("raster", "next-scale")


@pytest.fixture(scope="module")
def pipelines():
    return {name: ARPipeline.from_pretrained(name) for name in ORDERS}


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def done(self):
        return next(e for e in self.events if e.kind == "done")


def run_until_idle(scheduler):
    while scheduler.busy:
        scheduler.iterate()


@pytest.mark.parametrize("name", ORDERS)
def test_request_among_strangers_is_bit_identical_to_alone(pipelines, name):
    pipe = pipelines[name]
    mine = Request(name, [3, 7, 7], seed=11, config=pipe.config(), previews=True)

    alone, scheduler = Recorder(), Scheduler(pipelines)
    scheduler.submit(mine, alone)
    run_until_idle(scheduler)

    crowd, scheduler = Recorder(), Scheduler(pipelines, max_cohorts=4)
    early = Recorder()
    scheduler.submit(Request(name, [1, 2], seed=5, config=pipe.config(cfg_scale=1.0)), early)  # ahead of us
    scheduler.iterate()
    scheduler.submit(mine, crowd)
    # strangers in our own pass: unguided, another temperature and top-k; one leaves mid-way, one stays
    leaver = scheduler.submit(Request(name, [0, 0, 4], seed=3, config=pipe.config(temperature=0.7)), Recorder())
    stayer = Recorder()
    scheduler.submit(Request(name, [9], seed=0, config=pipe.config(cfg_scale=4.0, top_k=20)), stayer)
    scheduler.iterate()
    rows_with_strangers = scheduler.running_rows
    leaver.cancel()
    scheduler.iterate()
    late = Recorder()  # joins after we started
    scheduler.submit(Request(name, [5, 6], seed=8, config=pipe.config()), late)
    other = next(n for n in ORDERS if n != name)  # and another model's request interleaves with ours
    scheduler.submit(Request(other, [2], seed=1, config=pipelines[other].config()), Recorder())
    run_until_idle(scheduler)

    assert rows_with_strangers > 2 * 3 + 2  # we shared passes with others
    assert torch.equal(crowd.done.tokens, alone.done.tokens)
    assert torch.equal(crowd.done.images, alone.done.images)
    previews = [e.images for e in crowd.events if e.kind == "preview"]
    num_steps = pipe.generator.start(torch.tensor([0])).num_steps
    assert len(previews) == num_steps - 1  # every step but the last, which sends the final images
    for a, b in zip(previews, [e.images for e in alone.events if e.kind == "preview"], strict=True):
        assert torch.equal(a, b)
    # and what ARPipeline gives for the same labels and seed
    reference = pipe([3, 7, 7], seed=11, output_type="pt")
    assert torch.equal(crowd.done.tokens, reference.tokens)
    assert torch.equal(crowd.done.images, reference.images)
    for recorder in (early, stayer, late):
        assert recorder.done.images.shape[0] == len(recorder.done.tokens)
    stayer_alone = pipe([9], seed=0, output_type="pt", cfg_scale=4.0, top_k=20)
    assert torch.equal(stayer.done.tokens, stayer_alone.tokens)


def test_budgeted_next_scale_cache_runs_alone_and_matches(pipelines):
    pipe = pipelines["next-scale"]
    scheduler = Scheduler(pipelines)
    budgeted, plain = Recorder(), Recorder()
    scheduler.submit(Request("next-scale", [4, 1], seed=2, config=pipe.config(kv_budget=8)), budgeted)
    scheduler.submit(Request("next-scale", [3], seed=9, config=pipe.config()), plain)
    scheduler.iterate()
    assert len(scheduler.cohorts) == 2  # a ScaleKV budget's rows depend on the batch: never stacked
    run_until_idle(scheduler)
    assert torch.equal(budgeted.done.tokens, pipe([4, 1], seed=2, output_type="pt", kv_budget=8).tokens)


def test_queue_bound_rows_bound_and_cancel_before_start(pipelines):
    pipe = pipelines["raster"]
    scheduler = Scheduler(pipelines, max_rows=4, max_queue=3)
    first, second = Recorder(), Recorder()
    scheduler.submit(Request("raster", [1, 2], seed=0, config=pipe.config()), first)  # 4 guided rows
    waiting = scheduler.submit(Request("raster", [3], seed=0, config=pipe.config()), second)
    scheduler.submit(Request("raster", [3], seed=0, config=pipe.config()), Recorder())
    with pytest.raises(QueueFull):
        scheduler.submit(Request("raster", [4], seed=0, config=pipe.config()), Recorder())
    scheduler.iterate()
    assert scheduler.running_rows == 4 and len(scheduler.waiting) == 2  # the others wait for rows
    waiting.cancel()
    run_until_idle(scheduler)
    assert first.done.images.shape == (2, 1, 28, 28)
    assert second.events == []  # cancelled before it started: no work, no events
    assert scheduler.stats.cancelled == 1 and scheduler.stats.rejected == 1


def test_a_request_that_cannot_start_fails_alone(pipelines):
    pipe = pipelines["next-scale"]
    scheduler = Scheduler(pipelines)
    bad, good = Recorder(), Recorder()
    scheduler.submit(Request("next-scale", [1], seed=0, config=pipe.config(prune=0.5, prune_scales=99)), bad)
    scheduler.submit(Request("next-scale", [1], seed=0, config=pipe.config()), good)
    run_until_idle(scheduler)
    assert bad.events[0].kind == "error" and "prune_scales" in bad.events[0].message
    assert good.done.tokens.shape == (1, pipe.generator.seq_len)


def test_threaded_scheduler_stops_within_its_timeout(pipelines):
    import time

    pipe = pipelines["raster"]
    scheduler = Scheduler(pipelines).start()
    recorders = [Recorder() for _ in range(3)]
    for i, recorder in enumerate(recorders):
        scheduler.submit(Request("raster", [i], seed=i, config=pipe.config()), recorder)
    begin = time.monotonic()
    scheduler.stop(timeout=0.05)
    assert time.monotonic() - begin < 3
    for recorder in recorders:  # each request either finished or was told why not
        assert recorder.events == [] or recorder.events[-1].kind in ("done", "error")
