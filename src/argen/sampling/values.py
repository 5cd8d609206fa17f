"""How a step's prediction becomes token values: the one place that chooses by the order's kind of values.

A discrete order predicts logits, and its ids are drawn from them (guidance, temperature, top-k/p, the per-sample
draw of `logits.py`); a continuous order (MAR) predicts the conditions z of its diffusion head, and its vectors
are sampled by the head's loop with per-sample noise (`diffusion.py`). An order declares which in
`OrderSpec.values`; the decode loop and the server's scheduler both call `value_sampler(order).draw`, so neither
branches on it.

A call serves the rows of B samples, possibly of several requests: guidance scales are one per sample (MAR's
samples stand at their own point of its schedule; a server's requests at their own step), a scale of exactly 1
gives the conditional prediction bit for bit, and every draw comes from the sample's own generator. A sample's
values are therefore the same alone or among any others that share the call (`key` says what they must share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from argen.models.interface import OrderSpec, Prediction
from argen.sampling import diffusion
from argen.sampling.config import SamplerConfig
from argen.sampling.guidance import autoguide_rows, guide_rows
from argen.sampling.logits import check_finite, draw, process


@dataclass
class StepRows:
    """What B samples bring to one step's draw."""

    # positions (B, n), and logits (copies B, n, V) or z (copies B, n, Dz): the conditional rows, then one
    # unconditional row per sample when `scales` is given
    prediction: Prediction
    tokens: torch.Tensor  # (B, L) ids or (B, L, D) vectors: the samples' values so far (what padding keeps)
    filled: torch.Tensor  # (B, L) bool
    scales: torch.Tensor | None  # (B,) guidance scale per sample; None: no unconditional rows
    # (B,) each sample's step of `num_steps` (a server's requests that joined at different times stand at their own)
    steps: list[int]
    num_steps: int
    # autoguidance: the guide model's conditional output at the same positions (what the value sampler's `output`
    # reads of its prediction: logits (B, n, V), or the conditions z (B, n, Dz) of its own diffusion head), one
    # scale per sample, and the guide model itself (a continuous order's draw runs its head)
    guide: torch.Tensor | None = None
    guide_scales: torch.Tensor | None = None
    guide_model: Any = None

    def __len__(self) -> int:
        return self.filled.shape[0]

    def at(self) -> str:
        """Where the samples stand, for messages: "step 3", or "steps 2..5" when they differ."""
        lo, hi = min(self.steps, default=0), max(self.steps, default=0)
        return f"step {lo}" if lo == hi else f"steps {lo}..{hi}"


@dataclass
class Drawn:
    """B samples' values at their n positions."""

    values: torch.Tensor  # (B, n) ids or (B, n, D) vectors
    logits: torch.Tensor | None = None  # (B, n, V) the processed logits the ids were drawn from (what MaskGIT's
    # confidence reads); None for continuous values


class LogitValues:
    """Discrete ids drawn from logits: guidance, then temperature, top-k and top-p, then each sample's draw."""

    # Samples asking fewer positions than others share a call only at their own width: a padding position would
    # take a draw from the sample's generator.
    ragged = False

    @staticmethod
    def output(prediction: Prediction) -> torch.Tensor:
        """What a draw reads of a model's prediction besides its positions (a guide model's, under autoguidance)."""
        return prediction.logits

    @staticmethod
    def key(config: SamplerConfig, options: Any) -> tuple:
        """The settings a draw reads besides the per-sample scales, steps and generators: samples that agree on them
        may share one call."""
        return (config.temperature, config.top_k, config.top_p, config.greedy)

    @staticmethod
    def draw(
        model: Any, rows: StepRows, config: SamplerConfig, options: Any, generators: list[torch.Generator] | None
    ) -> Drawn:
        logits = rows.prediction.logits
        check_finite(logits, f"logits at {rows.at()}")
        cond = logits[: len(rows)]
        if rows.scales is not None:
            logits = guide_rows(logits, rows.scales)
        if rows.guide is not None:
            check_finite(rows.guide, f"the guide model's logits at {rows.at()}")
            logits = autoguide_rows(logits, cond, rows.guide, rows.guide_scales)
        logits = process(logits, config.temperature, config.top_k, config.top_p)
        return Drawn(draw(logits, generators, config.greedy), logits)


class HeadValues:
    """Continuous vectors sampled by the order's diffusion head (`model.head`, `model.head_schedule`) from its
    conditions z, with the order's head options (`head_steps_at`, DiSA's annealing, `head_clip`, and
    `head_cfg_interval`, the noise levels that guidance acts on)."""

    # Samples asking fewer positions than others share a call: their padding (a repeat of the first position) gets
    # no row of the head and no noise (`diffusion.padding_rows`).
    ragged = True

    @staticmethod
    def output(prediction: Prediction) -> torch.Tensor:
        return prediction.z

    @staticmethod
    def key(config: SamplerConfig, options: Any) -> tuple:
        # not the head's steps: samples at different AR steps under DiSA share one loop (`diffusion.RowGroup`)
        return (config.temperature, options.head_clip, options.head_cfg_interval)

    @staticmethod
    def draw(
        model: Any, rows: StepRows, config: SamplerConfig, options: Any, generators: list[torch.Generator] | None
    ) -> Drawn:
        check_finite(rows.prediction.z, f"the head's conditions z at {rows.at()}")
        if rows.guide is not None:
            check_finite(rows.guide, f"the guide model's conditions z at {rows.at()}")
        head_steps = [options.head_steps_at(step, rows.num_steps) for step in rows.steps]
        return Drawn(
            diffusion.sample_values(
                model, rows, head_steps, config.temperature, generators, options.head_clip, options.head_cfg_interval
            )
        )


VALUES = {"discrete": LogitValues, "continuous": HeadValues}


def value_sampler(order: OrderSpec) -> type[LogitValues] | type[HeadValues]:
    """How the order's predictions become values (`OrderSpec.values`)."""
    if order.values not in VALUES:
        raise ValueError(f"the {order.name} order has {order.values!r} values; argen samples {sorted(VALUES)}")
    return VALUES[order.values]
