"""The decode loop: drives any generator through its step interface."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from argen.errors import ConfigError
from argen.models.interface import Condition, Generator, as_condition
from argen.sampling import guidance
from argen.sampling.config import ParallelRows, SamplerConfig
from argen.sampling.positions import KnownTokens, policy_class
from argen.sampling.values import StepRows, value_sampler

if TYPE_CHECKING:  # speculative imports this module's config at run time
    from argen.sampling.speculative import SpeculativeStats


def seeded_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@dataclass
class Step:
    """What the decode loop yields after every step: the positions just committed and the tokens so far."""

    step: int
    num_steps: int
    positions: torch.Tensor  # (B, n) committed this step
    tokens: torch.Tensor  # (B, L) ids or (B, L, D) vectors; meaningful where `filled`
    filled: torch.Tensor  # (B, L) bool


def _rows(model: Generator, condition: Condition, known: KnownTokens | None) -> None:
    """Check a batch's conditions and known tokens against the model before any work."""
    condition.embedding_ids(model.num_classes)  # raises on a class id out of range
    B, L = len(condition), model.seq_len
    shape = (B, L) if model.order.values == "discrete" else (B, L, model.token_dim)
    if known is not None and (tuple(known.tokens.shape) != shape or known.known.shape != (B, L)):
        raise ValueError(
            f"known tokens must be {shape} and their mask ({B}, {L}), got {tuple(known.tokens.shape)} and "
            f"{tuple(known.known.shape)}: build them with the generator's tokenizer (its encode and token_mask)"
        )


def check_guide(model: Generator, guide_model: Generator | None) -> None:
    """A guide model for autoguidance: a weaker generator of the same order over the same tokens."""
    if guide_model is None:
        raise ConfigError(
            "guide_scale needs a guide model (autoguidance): a pipeline with a guide/ folder, or set guide_scale=1"
        )
    ours, theirs = ((m.order.name, m.vocab_size, m.seq_len, m.num_classes) for m in (model, guide_model))
    if ours != theirs:
        raise ConfigError(
            f"the guide model must share the generator's order, vocabulary, length and classes: {theirs} != {ours}"
        )
    # a continuous order's values are vectors of token_dim, which both heads denoise over one diffusion process
    if model.order.values == "continuous" and (
        guide_model.token_dim != model.token_dim
        or not torch.equal(guide_model.head_schedule.betas, model.head_schedule.betas)
        or guide_model.head_schedule.prediction != model.head_schedule.prediction
    ):
        raise ConfigError(
            "the guide model's diffusion head must sample the generator's value size and noise schedule, and "
            "predict what it predicts (eps or v)"
        )


@torch.no_grad()
def decode_steps(
    model: Generator,
    condition: Condition | torch.Tensor,
    config: SamplerConfig | None = None,
    generators: list[torch.Generator] | None = None,
    schedule: guidance.Schedule | None = None,
    known: KnownTokens | None = None,
    guide_model: Generator | None = None,
) -> Iterator[Step]:
    """The decode loop, one yield per step of the model's order, for B conditions (class ids are accepted).

    `schedule` overrides the config's guidance schedule (any function of progress t in [0, 1]); `known`
    keeps some tokens (editing); `guide_model` is the weaker model autoguidance contrasts with (read when the
    config's guide_scale is not 1), decoded beside the generator on the same values. The order's policy
    (`model.order.policy`) says which positions each step predicts and commits.
    """
    config = config or SamplerConfig()
    if config.acceleration is not None:
        raise ConfigError(
            f"step-by-step decoding (previews, editing) runs the plain sampler: unset {config.acceleration.name} "
            "decoding, or call generate()"
        )
    condition = as_condition(condition)
    _rows(model, condition, known)
    schedule = schedule or config.schedule()
    guide_schedule = config.guide_schedule()
    options = config.options_for(model.order)
    conditions = guidance.with_null_rows(condition) if schedule is not None else condition
    B, copies = len(condition), 2 if schedule is not None else 1
    state = model.start(conditions.to(model_device(model)), options)
    guide_state = None
    if guide_schedule is not None:
        check_guide(model, guide_model)
        guide_state = guide_model.start(condition.to(model_device(guide_model)), options)
    policy = policy_class(model.order.policy)(model, options, B, generators, known)
    policy.begin(state)
    if guide_state is not None:  # the guide starts from the canvas the generator does (known tokens a policy wrote)
        guide_state.tokens.copy_(state.tokens[:B])
        guide_state.filled.copy_(state.filled[:B])
    sampler = value_sampler(model.order)  # ids from logits, or vectors from the order's diffusion head
    while not state.done:
        asked = policy.positions(state)
        prediction = model.predict(state, None if asked is None else asked.repeat(copies, 1))
        progress = policy.guidance_progress(state)  # per sample (MAR: its own schedule)
        scales = None  # one guidance scale per sample
        if schedule is not None:
            scales = torch.tensor([schedule(float(t)) for t in progress])
        rows = StepRows(prediction, state.tokens[:B], state.filled[:B], scales, [state.step] * B, state.num_steps)
        if guide_state is not None:
            rows.guide = sampler.output(guide_model.predict(guide_state, asked)).to(sampler.output(prediction).device)
            rows.guide_scales = torch.tensor([guide_schedule(float(t)) for t in progress])
            rows.guide_model = guide_model
        drawn = sampler.draw(model, rows, config, options, generators)
        positions, values = policy.select(state, prediction.positions[:B], drawn.logits, drawn.values)
        if known is not None:
            values = known.apply(values, positions)
        model.advance(state, positions.repeat(copies, 1), values.repeat(copies, *([1] * (values.dim() - 1))))
        if guide_state is not None:
            guide_model.advance(guide_state, positions, values)
        # copies: the state lives on, and a caller may keep every step
        yield Step(state.step, state.num_steps, positions, state.tokens[:B].clone(), state.filled[:B].clone())


def model_device(model: Generator) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: Generator,
    condition: Condition | torch.Tensor,
    config: SamplerConfig | None = None,
    generators: list[torch.Generator] | None = None,
    schedule: guidance.Schedule | None = None,
    known: KnownTokens | None = None,
    draft_model: Generator | None = None,
    stats: SpeculativeStats | None = None,
    codebook: torch.Tensor | None = None,
    guide_model: Generator | None = None,
) -> torch.Tensor:
    """Sample token sequences: B conditions -> ids (B, seq_len). Arguments as `decode_steps`; with a speculative
    acceleration, the same distribution is sampled with fewer target passes (`draft_model` is the
    drafter of speculative='draft', `stats` a speculative.SpeculativeStats to count acceptances, `codebook` the
    tokenizer's code vectors for relaxed acceptance; `guide_model` the weaker model of autoguidance)."""
    config = config or SamplerConfig()
    acceleration = config.acceleration
    if acceleration is None:
        steps = decode_steps(model, condition, config, generators, schedule, known, guide_model)
        return collections.deque(steps, maxlen=1)[0].tokens  # run the loop, keep the final step
    if acceleration.name not in model.order.accelerations:
        fits = sorted(model.order.accelerations) or ["none"]
        raise ConfigError(
            f"{acceleration.name} decoding does not fit the {model.order.name} order (it supports: {', '.join(fits)})"
        )
    if config.guide_scale != 1.0:
        raise ConfigError(
            f"autoguidance (guide_scale {config.guide_scale:g}) is not combined with {acceleration.name} decoding "
            "yet: set guide_scale=1 (--guide 1)"
        )
    if known is not None:
        raise ConfigError(f"editing (known tokens) is not combined with {acceleration.name} decoding")
    condition = as_condition(condition)
    _rows(model, condition, known)
    condition = condition.to(model_device(model))
    schedule = schedule or config.schedule()
    if isinstance(acceleration, ParallelRows):
        from argen.sampling.parallel import generate_parallel

        return generate_parallel(model, condition, config, generators, schedule, acceleration.window)
    from argen.sampling.speculative import generate_speculative

    return generate_speculative(model, condition, config, generators, schedule, draft_model, stats, codebook)
