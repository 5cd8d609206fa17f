"""MaskGIT's unmasking policy: the schedule's counts, confidence with annealed Gumbel noise, known tokens (in- and
out-painting), and per-sample independence when samples commit different numbers of positions."""

import math

import pytest
import torch

from argen.models.interface import Condition, DecodeState
from argen.models.masked import MaskedOptions
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import decode_steps, generate, seeded_generators
from argen.sampling.masked import MaskedPolicy, annealed_confidence, commit_counts
from argen.sampling.positions import KnownTokens
from tests.models.test_masked import tiny_masked


def _counts(masked_at_start: int, steps: int, options: MaskedOptions) -> list[int]:
    start = torch.tensor([masked_at_start])
    now, counts = start.clone(), []
    for step in range(steps):
        count = commit_counts(start, now, step, steps, options)
        counts.append(int(count))
        now = now - count
    return counts


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square"])
@pytest.mark.parametrize("L, steps", [(49, 8), (49, 12), (16, 10), (9, 12), (256, 10)])
def test_schedule_fills_everything_in_steps_and_commits_at_least_one(L, steps, schedule):
    counts = _counts(L, steps, MaskedOptions(steps=steps, mask_schedule=schedule))
    assert sum(counts) == L
    remaining = [L - sum(counts[: s + 1]) for s in range(steps)]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
    busy = [c for c in counts if c]
    assert counts[: len(busy)] == busy and all(c >= 1 for c in busy)  # only once all is filled does a step idle


def test_cosine_counts_follow_maskgit():
    """MaskGIT §3.2: floor(L cos(pi/2 (s + 1) / T)) stay masked after step s; cosine starts with few tokens."""
    L, T = 256, 8
    counts = _counts(L, T, MaskedOptions(steps=T))
    stay = [math.floor(L * math.cos(math.pi / 2 * (s + 1) / T)) for s in range(T - 1)] + [0]
    assert [L - sum(counts[: s + 1]) for s in range(T)] == stay
    assert counts[0] < counts[T // 2]  # concave: early steps commit fewer tokens


def test_counts_are_per_sample():
    start = torch.tensor([16, 4, 0])  # known tokens leave different amounts to generate
    count = commit_counts(start, start, 0, 4, MaskedOptions(steps=4))
    for b in range(3):
        assert count[b] == commit_counts(start[b : b + 1], start[b : b + 1], 0, 4, MaskedOptions(steps=4))[0]
    assert count.tolist()[2] == 0


def test_confidence_noise_is_annealed_to_nothing_at_the_last_step():
    log_p = torch.tensor([[-0.1, -3.0, -0.5, -2.0, -1.0, -4.0]])
    noise = -torch.log(-torch.log(torch.rand(1, 6, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(annealed_confidence(log_p, 1.0, 1000.0, noise), log_p)  # t = 1: pure confidence
    nearly = annealed_confidence(log_p, 1.0 - 1e-6, 1000.0, noise)  # noise scale 1e-3
    assert torch.equal(nearly.argsort(descending=True), log_p.argsort(descending=True))
    early = [
        annealed_confidence(log_p, 0.0, 1000.0, -torch.log(-torch.log(torch.rand(1, 6, generator=g)))).argmax()
        for g in seeded_generators(range(8))
    ]
    assert {int(i) for i in early} != {0}  # t = 0 with a large temperature: the noise decides


def _state(B: int, L: int, num_steps: int, filled: torch.Tensor | None = None) -> DecodeState:
    filled = torch.zeros(B, L, dtype=torch.bool) if filled is None else filled
    return DecodeState(Condition.classes([0] * B), torch.zeros(B, L, dtype=torch.long), filled, num_steps=num_steps)


def test_select_commits_the_most_confident_unfilled_positions_and_pads_with_its_own():
    B, L, V = 2, 8, 5
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(0)) * 3
    values = logits.argmax(-1)
    filled = torch.zeros(B, L, dtype=torch.bool)
    filled[1, :6] = True  # sample 1 has two positions left, sample 0 eight
    state = _state(B, L, 2, filled)
    state.tokens[1, :6] = torch.tensor([4, 3, 2, 1, 0, 4])
    policy = MaskedPolicy(None, MaskedOptions(steps=2, choice_temperature=0.0), 2, seeded_generators([0, 1]), None)
    policy.begin(state)
    positions = torch.arange(L).expand(B, L)
    chosen, kept = policy.select(state, positions, logits, values)
    counts = commit_counts(torch.tensor([8, 2]), torch.tensor([8, 2]), 0, 2, policy.options)
    assert chosen.shape == (B, int(counts.max())) and counts.tolist()[1] < counts.tolist()[0]
    log_p = logits.log_softmax(-1).gather(-1, values[..., None])[..., 0]
    best = log_p[0].argsort(descending=True)[: int(counts[0])]
    assert chosen[0].tolist() == best.tolist()  # no noise: the most confident ones
    assert torch.equal(kept, values.gather(1, chosen))
    row = chosen[1].tolist()
    assert set(row) <= {6, 7} and len(set(row)) == int(counts[1])  # only unfilled; padded with a repeat
    assert row[int(counts[1]) :] == [row[0]] * (len(row) - int(counts[1]))


def test_select_noise_comes_from_each_samples_generator():
    L, V = 16, 8
    logits = torch.randn(1, L, V, generator=torch.Generator().manual_seed(1))
    values = logits.argmax(-1)
    picks = set()
    for seed in range(6):
        policy = MaskedPolicy(
            None, MaskedOptions(steps=8, choice_temperature=50.0), 1, seeded_generators([seed]), None
        )
        state = _state(1, L, 8)
        policy.begin(state)
        picks.add(tuple(policy.select(state, torch.arange(L)[None], logits, values)[0][0].tolist()))
    assert len(picks) > 1
    again = MaskedPolicy(None, MaskedOptions(steps=8, choice_temperature=50.0), 1, seeded_generators([5]), None)
    state = _state(1, L, 8)
    again.begin(state)
    assert tuple(again.select(state, torch.arange(L)[None], logits, values)[0][0].tolist()) in picks


@pytest.mark.parametrize("steps", [1, 4, 10, 12])
def test_decoding_fills_the_canvas_in_exactly_steps_steps(steps):
    model = tiny_masked()  # 9 positions: 10 and 12 steps outnumber them, and the last steps only re-commit
    config = SamplerConfig.from_flat({"steps": steps, "cfg_scale": 2.0, "cfg_schedule": "linear"})
    trace = [
        s.filled.clone() for s in decode_steps(model, Condition.classes([0, 2]), config, seeded_generators([0, 1]))
    ]
    assert len(trace) == steps and trace[-1].all()
    filled = [int(f[0].sum()) for f in trace]
    assert filled == sorted(filled) and max(filled) == 9
    assert filled[0] >= 1 and all(b > a for a, b in zip(filled, filled[1:], strict=False) if a < 9)


def _paint(keep_center: bool) -> tuple[KnownTokens, torch.Tensor]:
    """4 x 4 canvases: in-painting keeps the border and regenerates the centre 2 x 2; out-painting the reverse."""
    g = torch.Generator().manual_seed(3)
    source = torch.randint(0, 16, (2, 16), generator=g)
    center = torch.zeros(4, 4, dtype=torch.bool)
    center[1:3, 1:3] = True
    known = (center if keep_center else ~center).flatten().expand(2, 16).clone()
    return KnownTokens(source, known), source


@pytest.mark.parametrize("keep_center", [False, True], ids=["in-painting", "out-painting"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_in_and_out_painting_keep_the_known_tokens(keep_center, cfg):
    model = tiny_masked(grid_size=4)
    known, source = _paint(keep_center)
    config = SamplerConfig(cfg_scale=cfg, order_options={"steps": 4})
    steps = decode_steps(model, Condition.classes([0, 1]), config, seeded_generators([0, 1]), known=known)
    trace = [(s.tokens.clone(), s.filled.clone()) for s in steps]  # a step's tensors are the live state
    assert len(trace) == 4 and trace[-1][1].all()
    for tokens, filled in trace:  # kept from the first step on, never rewritten
        assert torch.equal(tokens[known.known], source[known.known]) and filled[known.known].all()
    hole = trace[0][1][~known.known]
    assert hole.any() and not hole.all()  # the hole fills over several steps
    other = generate(model, Condition.classes([0, 1]), config, seeded_generators([5, 6]), known=known)
    assert torch.equal(other[known.known], source[known.known])
    assert not torch.equal(other, trace[-1][0])  # the hole is sampled, the seed matters


def test_samples_with_different_known_tokens_batch_like_singles():
    """Known tokens leave each sample a different amount to generate, so samples commit different numbers of
    positions per step; the padding must not let one sample change another."""
    model = tiny_masked(grid_size=4)
    g = torch.Generator().manual_seed(4)
    source = torch.randint(0, 16, (3, 16), generator=g)
    known = torch.stack([torch.zeros(16, dtype=torch.bool), torch.rand(16, generator=g) < 0.7, torch.ones(16) > 0])
    config = SamplerConfig(cfg_scale=2.0, temperature=1.3, order_options={"steps": 5, "choice_temperature": 2.0})
    classes, seeds = [0, 1, 2], [7, 8, 9]
    batch = generate(
        model, Condition.classes(classes), config, seeded_generators(seeds), known=KnownTokens(source, known)
    )
    singles = [
        generate(
            model,
            Condition.classes([c]),
            config,
            seeded_generators([s]),
            known=KnownTokens(source[i : i + 1], known[i : i + 1]),
        )
        for i, (c, s) in enumerate(zip(classes, seeds, strict=True))
    ]
    assert torch.equal(batch, torch.cat(singles))
    assert torch.equal(batch[2], source[2])  # all known: nothing to generate
