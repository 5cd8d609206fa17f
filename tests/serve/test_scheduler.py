"""The scheduler's contract: a request's images are bit-identical whether it ran alone or among strangers that
joined and left mid-way, for every shipped order (MAR's continuous values included); cancellation, bounds and
per-request failures."""

import copy

import pytest
import torch

from argen.pipeline import ARPipeline
from argen.serve.scheduler import QueueFull, Request, Scheduler

ORDERS = ("raster", "next-scale", "masked", "random-order", "mar")


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


def steps_of(pipe, **options):
    return pipe.generator.start(torch.tensor([0]), pipe.config(**options).options_for(pipe.generator.order)).num_steps


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

    crowd, scheduler = Recorder(), Scheduler(pipelines, max_batches=4)
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
    num_steps = steps_of(pipe)
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


def test_generators_are_made_on_the_device_the_pipeline_makes_them_on(pipelines, monkeypatch):
    """On a GPU a seed's draws depend on the generator's device, so a request's images equal ARPipeline's only if
    both make their generators alike. CI has no second device for generators (`meta` makes none, and the draws
    are moved to the model's device, which DeviceGuard allows); `cpu:0` stands in: tensors and generators take
    it, and it is not `cpu`, so every device a generator was asked for is recorded and compared."""
    made = []  # (device asked for, generator)
    make = torch.Generator

    def recorded(device="cpu"):
        made.append((torch.device(device), make(device=device)))
        return made[-1][1]

    monkeypatch.setattr(ARPipeline, "device", property(lambda self: torch.device("cpu", 0)))
    monkeypatch.setattr(torch, "Generator", recorded)
    pipe = pipelines["next-scale"]
    served, scheduler = Recorder(), Scheduler(pipelines)
    scheduler.submit(Request("next-scale", [3, 7], seed=11, config=pipe.config()), served)
    run_until_idle(scheduler)
    by_scheduler = [(device, g.initial_seed()) for device, g in made]
    made.clear()
    reference = pipe([3, 7], seed=11, output_type="pt")
    by_pipeline = [(device, g.initial_seed()) for device, g in made]

    assert by_scheduler == by_pipeline == [(torch.device("cpu", 0), 11), (torch.device("cpu", 0), 12)]
    assert torch.equal(served.done.tokens, reference.tokens)


@pytest.mark.parametrize(
    "name, options",
    [
        ("raster", {}),
        ("masked", {}),
        ("random-order", {}),
        ("random-order", {"steps": 20}),
        ("mar", {"steps": 12, "head_steps": 10}),
    ],
    ids=["raster", "masked", "random-order", "random-order-20-steps", "mar"],
)
def test_a_request_joining_mid_way_shares_passes_with_rows_at_other_steps(pipelines, name, options):
    """Continuous batching proper: an arrival joins the running batch at its own step 0 beside rows many steps
    ahead, stays while they leave, and gets the images it gets alone. (Random-order in 20 steps and MAR: rows at
    different steps ask different numbers of positions in the same pass; MAR's rows hold different numbers of
    known latents.)"""
    pipe = pipelines[name]
    mine = Request(name, [2, 8], seed=21, config=pipe.config(cfg_scale=1.5, **options), previews=True)
    alone = Recorder()
    scheduler = Scheduler(pipelines)
    scheduler.submit(mine, alone)
    run_until_idle(scheduler)

    scheduler, crowd, ahead, behind = Scheduler(pipelines), Recorder(), Recorder(), Recorder()
    scheduler.submit(Request(name, [4, 4, 1], seed=7, config=pipe.config(temperature=0.8, **options)), ahead)
    for _ in range(5):
        scheduler.iterate()
    scheduler.submit(mine, crowd)
    scheduler.iterate()  # one pass: the earlier request's rows at step 5, ours at step 0
    (batch,) = scheduler.batches
    assert [job.step for job in batch.jobs] == [6, 1]
    assert scheduler.stats.forward_passes == 6 and scheduler.stats.mixed_passes == 1
    for _ in range(3):
        scheduler.iterate()
    scheduler.submit(Request(name, [0], seed=3, config=pipe.config(cfg_scale=1.0, **options)), behind)  # after us
    run_until_idle(scheduler)

    # one batch throughout: the last request ends 9 passes after the first, and every pass while two requests
    # ran held rows at different steps (passes 6..N with the first, N+1..N+5 with the last): nothing waited to align
    N = steps_of(pipe, **options)
    assert scheduler.stats.forward_passes == N + 9 and scheduler.stats.mixed_passes == N
    assert ahead.done.tokens.shape[0] == 3 and behind.done.tokens.shape[0] == 1
    assert torch.equal(crowd.done.tokens, alone.done.tokens)
    assert torch.equal(crowd.done.images, alone.done.images)
    for a, b in zip(
        [e.images for e in crowd.events if e.kind == "preview"],
        [e.images for e in alone.events if e.kind == "preview"],
        strict=True,
    ):
        assert torch.equal(a, b)
    assert torch.equal(crowd.done.tokens, pipe([2, 8], seed=21, output_type="pt", cfg_scale=1.5, **options).tokens)
    reference = pipe([4, 4, 1], seed=7, output_type="pt", temperature=0.8, **options)
    assert torch.equal(ahead.done.tokens, reference.tokens)


def test_next_scale_never_mixes_steps(pipelines):
    """Next-scale rows share a pass at the same scale only: an arrival opens a batch of its own at step 0, and
    batches of different options never merge."""
    pipe = pipelines["next-scale"]
    scheduler = Scheduler(pipelines, max_batches=4)
    scheduler.submit(Request("next-scale", [1], seed=0, config=pipe.config()), Recorder())
    scheduler.iterate()
    scheduler.submit(Request("next-scale", [2], seed=1, config=pipe.config()), Recorder())
    scheduler.submit(Request("next-scale", [3], seed=2, config=pipe.config()), Recorder())  # joins the one above
    scheduler.iterate()
    assert [len(b.jobs) for b in scheduler.batches] == [1, 2]
    run_until_idle(scheduler)
    assert scheduler.stats.mixed_passes == 0


def test_mar_requests_share_the_pass_and_the_head(pipelines, monkeypatch):
    """MAR rows share the transformer's pass, and requests that agree on the head's settings share its sampling
    loop (each image's noise from its own generator, each request's guidance scale per row); a later arrival joins
    the running batch at its own step 0. Every request gets its images alone, bit for bit."""
    from argen.sampling import diffusion

    # DiSA: the head's steps fall from 10 to 4 over the 6 AR steps, so requests at different steps run different
    # numbers of head steps, and still share one loop (`diffusion.RowGroup`: the loops end together)
    pipe, fast = pipelines["mar"], {"steps": 6, "head_steps": 10, "head_steps_last": 4}
    head_calls = []
    sample_head = diffusion.sample_head

    def counting(head, z, *args, **kwargs):
        head_calls.append(len(z))
        return sample_head(head, z, *args, **kwargs)

    monkeypatch.setattr(diffusion, "sample_head", counting)
    settings = [  # (labels, seed, sampler overrides)
        ([3, 7], 11, {}),
        ([1], 4, {"cfg_scale": 2.0}),  # another guidance scale: the same head call
        ([5], 6, {"cfg_scale": 1.0}),  # unguided: a call of its own (no unconditional rows)
        ([2, 2], 8, {"temperature": 0.8}),  # another temperature: a call of its own
    ]
    scheduler, recorders = Scheduler(pipelines), []
    for labels, seed, overrides in settings:
        recorders.append(Recorder())
        scheduler.submit(Request("mar", labels, seed, pipe.config(**fast, **overrides)), recorders[-1])
    scheduler.iterate()
    (batch,) = scheduler.batches
    assert len(batch.jobs) == 4 and scheduler.stats.forward_passes == 1
    assert sorted(head_calls) == [2, 4, 6]  # 2 positions a sample at the first of 6 steps: 3, 1 and 2 samples
    for _ in range(2):
        scheduler.iterate()
    late = Recorder()
    scheduler.submit(Request("mar", [9], 0, pipe.config(**fast)), late)
    before = len(head_calls)
    scheduler.iterate()  # the arrival joins the running batch at its own step 0, beside rows at step 3
    (batch,) = scheduler.batches
    assert [job.step for job in batch.jobs] == [4, 4, 4, 4, 1] and scheduler.stats.forward_passes == 4
    # it reveals another number of positions than the rows at step 3, with 10 head steps against their 6, and still
    # shares their head loop
    assert len(head_calls) - before == 3
    run_until_idle(scheduler)
    assert scheduler.stats.forward_passes == 3 + 6 and scheduler.stats.mixed_passes == 3
    monkeypatch.undo()
    for (labels, seed, overrides), recorder in zip(settings, recorders, strict=True):
        alone = pipe(labels, seed=seed, output_type="pt", **fast, **overrides)
        assert torch.equal(recorder.done.tokens, alone.tokens)
        assert torch.equal(recorder.done.images, alone.images)
    assert torch.equal(late.done.tokens, pipe([9], seed=0, output_type="pt", **fast).tokens)


def _with_guide(pipe: ARPipeline) -> ARPipeline:
    """The pipeline with a guide for autoguidance: its generator with every matrix perturbed (a weaker model of the
    same order, as far as the scheduler can tell)."""
    guide = copy.deepcopy(pipe.generator)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in guide.parameters():
            if p.dim() == 2:
                p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return ARPipeline(pipe.tokenizer, pipe.generator, pipe.class_names, pipe.sampler, guide=guide)


@pytest.mark.parametrize("name", ORDERS)
def test_autoguided_requests_batch_their_guide_rows_and_match_the_pipeline(pipelines, name):
    """Under autoguidance a batch runs the guide model's rows beside its own, stacked, taken out and advanced with
    them: an autoguided request among strangers (autoguided or not, joining and leaving) gets ARPipeline's images."""
    pipe = _with_guide(pipelines[name])
    served = {**pipelines, name: pipe}
    scheduler, mine, other, plain = Scheduler(served, max_batches=4), Recorder(), Recorder(), Recorder()
    scheduler.submit(Request(name, [3, 7], seed=11, config=pipe.config(guide_scale=2.5)), mine)
    # no guide (next-scale's default has one): a batch of its own
    scheduler.submit(Request(name, [1], seed=2, config=pipe.config(guide_scale=1.0)), plain)
    leaver = scheduler.submit(Request(name, [0, 5], seed=4, config=pipe.config(guide_scale=1.5)), Recorder())
    scheduler.iterate()
    guided = [b for b in scheduler.batches if b.guide is not None]
    assert [len(b.jobs) for b in guided] == [2] and len(guided[0].guide.tokens) == 4
    assert scheduler.running_rows == 2 * 4 + 4 + 2  # guided images run 3 rows: conditional, unconditional, guide
    leaver.cancel()
    scheduler.iterate()
    # joins at its own step 0 (row_steps orders) or opens a batch of its own (next-scale)
    scheduler.submit(Request(name, [9], seed=6, config=pipe.config(guide_scale=3.0, cfg_scale=1.0)), other)
    run_until_idle(scheduler)
    reference = pipe([3, 7], seed=11, output_type="pt", guide_scale=2.5)
    assert torch.equal(mine.done.tokens, reference.tokens)
    assert torch.equal(mine.done.images, reference.images)
    unguided = pipe([3, 7], seed=11, output_type="pt", guide_scale=1.0)
    assert not torch.equal(mine.done.tokens, unguided.tokens)  # the guide mattered
    assert torch.equal(other.done.tokens, pipe([9], seed=6, output_type="pt", guide_scale=3.0, cfg_scale=1.0).tokens)
    assert torch.equal(plain.done.tokens, pipe([1], seed=2, output_type="pt", guide_scale=1.0).tokens)


def test_the_batch_bound_holds_back_same_step_orders_only(pipelines):
    """max_batches gathers same-step arrivals into full batches; a raster request has nothing to wait for, nor has
    a request of another model."""
    scheduler = Scheduler(pipelines, max_batches=1)
    scheduler.submit(Request("next-scale", [1], seed=0, config=pipelines["next-scale"].config()), Recorder())
    scheduler.iterate()
    scheduler.submit(Request("raster", [2], seed=0, config=pipelines["raster"].config()), Recorder())
    scheduler.submit(Request("next-scale", [3], seed=0, config=pipelines["next-scale"].config()), Recorder())
    scheduler.iterate()
    assert [b.key[0] for b in scheduler.batches] == ["next-scale", "raster"] and len(scheduler.waiting) == 1
    # a request the bound holds back does not hold back other models' requests behind it
    scheduler.submit(Request("mar", [4], seed=0, config=pipelines["mar"].config(steps=4, head_steps=5)), Recorder())
    scheduler.submit(Request("masked", [5], seed=0, config=pipelines["masked"].config()), Recorder())
    scheduler.iterate()
    assert [b.key[0] for b in scheduler.batches] == ["next-scale", "raster", "mar", "masked"]
    assert [job.request.model for job in scheduler.waiting] == ["next-scale"]
    run_until_idle(scheduler)


def test_budgeted_next_scale_cache_runs_alone_and_matches(pipelines):
    pipe = pipelines["next-scale"]
    scheduler = Scheduler(pipelines)
    budgeted, plain = Recorder(), Recorder()
    scheduler.submit(Request("next-scale", [4, 1], seed=2, config=pipe.config(kv_budget=8)), budgeted)
    scheduler.submit(Request("next-scale", [3], seed=9, config=pipe.config()), plain)
    scheduler.iterate()
    assert len(scheduler.batches) == 2  # a ScaleKV budget's rows depend on the batch: never stacked
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
