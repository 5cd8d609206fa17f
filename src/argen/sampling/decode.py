"""The decode loop: drives any generator through its step interface."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from argen.models.interface import Generator
from argen.sampling import guidance
from argen.sampling.logits import check_finite, draw, process

if TYPE_CHECKING:  # speculative imports this module's config at run time
    from argen.sampling.speculative import SpeculativeStats


@dataclass
class SamplerConfig:
    cfg_scale: float = 1.0  # 1 = no guidance (the unconditional half is not even computed)
    cfg_schedule: str = "constant"  # a key of guidance.SCHEDULES
    temperature: float = 1.0
    top_k: int = 0  # 0 = no filtering
    top_p: float = 1.0
    greedy: bool = False  # argmax instead of a draw
    speculative: str = "none"  # "none", "sjd"/"mc-sjd" (speculative Jacobi) or "draft" (a draft model)
    window: int = 8  # tokens drafted per speculative step
    parallel_window: int = 0  # > 0: decode rows in parallel, a row starting this many tokens behind the one above
    relax_k: int = 0  # > 0: relaxed (lossy) speculative acceptance over each draft's relax_k nearest codes (LANTERN)
    relax_delta: float = 0.1  # LANTERN's bound on the probability mass a draft may borrow from its neighbours
    prune: float = 0.0  # next-scale: fraction of the largest map's tokens the later layers skip (FastVAR; lossy)
    prune_scales: int = 2  # next-scale: how many of the largest scales are pruned (the ratio falls linearly)
    kv_budget: int = 0  # next-scale: KV entries a refiner layer keeps after each scale (ScaleKV; lossy); 0 = all
    kv_drafters: int = 1  # next-scale: layers with the widest attention, which keep their whole cache

    def __post_init__(self) -> None:
        if self.speculative not in ("none", "sjd", "mc-sjd", "draft"):
            raise ValueError(f"speculative must be 'none', 'sjd', 'mc-sjd' or 'draft', got {self.speculative!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.parallel_window < 0:
            raise ValueError(f"parallel_window must be >= 0, got {self.parallel_window}")
        if self.parallel_window and self.speculative != "none":
            raise ValueError("choose speculative or parallel decoding, not both")
        if self.relax_k < 0 or not 0.0 <= self.relax_delta <= 1.0:
            raise ValueError(f"relax_k must be >= 0 and relax_delta in [0, 1], got {self.relax_k}, {self.relax_delta}")
        if self.relax_k and self.speculative == "none":
            raise ValueError("relax_k relaxes speculative acceptance: set speculative too")
        if self.model_options() and (self.speculative != "none" or self.parallel_window):
            raise ValueError("prune / kv_budget (next-scale) are not combined with speculative or parallel decoding")
        if self.cfg_schedule not in guidance.SCHEDULES:
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} unknown; choose from {sorted(guidance.SCHEDULES)}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    def model_options(self) -> dict:
        """The settings the generator itself applies (passed to its `start`); empty when all are off."""
        options = {}
        if self.prune:
            options.update(prune=self.prune, prune_scales=self.prune_scales)
        if self.kv_budget:
            options.update(kv_budget=self.kv_budget, kv_drafters=self.kv_drafters)
        return options

    def schedule(self) -> guidance.Schedule | None:
        if self.cfg_scale == 1.0 and self.cfg_schedule == "constant":
            return None
        return guidance.SCHEDULES[self.cfg_schedule](self.cfg_scale)


def seeded_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@dataclass
class KnownTokens:
    """Tokens to keep instead of sampling (zero-shot editing, VAR §4.4): where `known` is True the sampler
    teacher-forces `tokens` at every step, so the rest is generated around them."""

    tokens: torch.Tensor  # (B, L) ids
    known: torch.Tensor  # (B, L) bool

    def apply(self, ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        a, b = span
        return torch.where(self.known[:, a:b], self.tokens[:, a:b], ids)


@dataclass
class Step:
    """What the decode loop yields after every step: the ids chosen so far (-1 where none yet)."""

    step: int
    num_steps: int
    span: tuple[int, int]
    tokens: torch.Tensor  # (B, L)


@torch.no_grad()
def decode_steps(
    model: Generator,
    labels: torch.Tensor,
    config: SamplerConfig | None = None,
    generators: list[torch.Generator] | None = None,
    schedule: guidance.Schedule | None = None,
    known: KnownTokens | None = None,
) -> Iterator[Step]:
    """The decode loop, one yield per step of the model's order. labels: (B,).

    `schedule` overrides the config's guidance schedule (any function of progress t in [0, 1]);
    `known` teacher-forces some tokens (editing).
    """
    config = config or SamplerConfig()
    if config.speculative != "none" or config.parallel_window:
        raise ValueError(
            "step-by-step decoding (previews, editing) runs the plain sampler: unset speculative and "
            "parallel_window, or call generate()"
        )
    schedule = schedule or config.schedule()
    if labels.dim() != 1:
        raise ValueError(f"labels must be (B,), got {tuple(labels.shape)}")
    if ((labels < 0) | (labels > model.num_classes)).any():
        raise ValueError(f"labels must be in 0..{model.num_classes} ({model.num_classes} = unconditional)")
    B = labels.shape[0]
    if known is not None and (known.tokens.shape != (B, model.seq_len) or known.known.shape != (B, model.seq_len)):
        raise ValueError(f"known tokens and mask must be (B, {model.seq_len}) = ({B}, {model.seq_len})")
    if schedule is not None:
        labels = guidance.with_null_rows(labels, model.num_classes)
    options = config.model_options()
    unsupported = sorted(set(options) - set(getattr(model, "start_options", ())))
    if unsupported:
        raise ValueError(f"{type(model).__name__} does not support the sampler settings {', '.join(unsupported)}")
    state = model.start(labels, **options)
    while not state.done:
        logits = model.predict(state)  # (B or 2B, n, V)
        check_finite(logits, f"logits at step {state.step}")
        if schedule is not None:
            t = state.step / max(state.num_steps - 1, 1)
            logits = guidance.guide(logits, schedule(t))
        ids = draw(process(logits, config.temperature, config.top_k, config.top_p), generators, config.greedy)
        if known is not None:
            ids = known.apply(ids, state.span)
        span = state.span
        model.advance(state, ids if schedule is None else ids.repeat(2, 1))
        yield Step(state.step, state.num_steps, span, state.tokens[:B])


def generate(
    model: Generator,
    labels: torch.Tensor,
    config: SamplerConfig | None = None,
    generators: list[torch.Generator] | None = None,
    schedule: guidance.Schedule | None = None,
    known: KnownTokens | None = None,
    draft_model: Generator | None = None,
    stats: SpeculativeStats | None = None,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample token sequences: labels (B,) -> ids (B, seq_len). Arguments as `decode_steps`; with
    `config.speculative` set, the same distribution is sampled with fewer target passes (`draft_model` is the
    drafter of speculative='draft', `stats` a speculative.SpeculativeStats to count acceptances, `codebook` the
    tokenizer's code vectors for relaxed acceptance)."""
    config = config or SamplerConfig()
    if config.parallel_window:
        if known is not None:
            raise ValueError("editing (known tokens) is not combined with parallel decoding")
        from argen.sampling.parallel import generate_parallel

        return generate_parallel(
            model, labels, config, generators, schedule or config.schedule(), config.parallel_window
        )
    if config.speculative != "none":
        if known is not None:
            raise ValueError("editing (known tokens) is not combined with speculative decoding")
        from argen.sampling.speculative import generate_speculative

        return generate_speculative(
            model, labels, config, generators, schedule or config.schedule(), draft_model, stats, codebook
        )
    steps = decode_steps(model, labels, config, generators, schedule, known)
    return collections.deque(steps, maxlen=1)[0].tokens  # run the loop, keep the final step
