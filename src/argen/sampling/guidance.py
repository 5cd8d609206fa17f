"""Classifier-free guidance and its schedules; autoguidance's contrast with a weaker model.

A schedule is a plain function of progress t in [0, 1] (0 at the first step, 1 at the last) giving the
scale s; guided logits = uncond + s * (cond - uncond). s = 1 is the conditional model alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from argen.models.interface import Condition

Schedule = Callable[[float], float]


def constant(scale: float) -> Schedule:
    """LlamaGen: the same scale at every step."""
    return lambda t: scale


def linear(scale: float) -> Schedule:
    """Guidance that grows from 1 at the first step to `scale` at the last."""
    return lambda t: 1.0 + (scale - 1.0) * t


def var_ramp(scale: float) -> Schedule:
    """VAR's ramp, (1 + w t) cond - w t uncond, in argen's one convention (scale 1 = no guidance): s = 1 + w t
    with w = scale - 1, so VAR's `cfg=4` is `cfg_scale=5` here. The same curve as `linear`."""
    return linear(scale)


def interval(scale: float, cfg_interval: int, num_steps: int) -> Schedule:
    """LlamaGen's cfg_interval: its decode counter i produces token i + 1 (token 0 comes from the prefill) and
    is guided while i <= cfg_interval, so tokens 0..cfg_interval+1 are guided, the rest conditional alone."""
    return lambda t: scale if round(t * max(num_steps - 1, 1)) - 1 <= cfg_interval else 1.0


SCHEDULES: dict[str, Callable[[float], Schedule]] = {"constant": constant, "linear": linear, "var_ramp": var_ramp}


def with_null_rows(condition: Condition) -> Condition:
    """B conditions -> 2B: the conditional rows, then one unconditional row per sample."""
    return condition.cat(condition.as_null())


def position_scales(schedule: Schedule, positions, num_steps: int) -> torch.Tensor:
    """(n,) guidance scales for tokens at these step indices (orders that sample several positions at once)."""
    return torch.tensor([schedule(p / max(num_steps - 1, 1)) for p in positions])


def guide_rows(out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(2B, ...) conditional rows first -> (B, ...): uncond + s (cond - uncond), and the conditional rows
    themselves, bit for bit, where s = 1. The one CFG formula, for logits and a diffusion head's noise alike.

    scales: (B,) one per sample (the decode loop, the server: samples at their own point of the schedule), or
    (B, n) / (1, n) one per sample and position (decoding that samples several positions a pass at different
    points of the schedule: parallel, speculative); broadcast over the trailing dimensions."""
    cond, uncond = out.chunk(2, dim=0)
    s = scales.to(out.device, out.dtype)
    if s.dim() > out.dim() or (s.dim() and s.shape[0] not in (1, len(cond))):
        # (n,) per-position scales passed without their row dimension would broadcast as one per sample
        raise ValueError(f"guidance scales of shape {tuple(s.shape)} do not fit {len(cond)} samples {cond.shape}")
    s = s.reshape(*s.shape, *([1] * (out.dim() - s.dim())))
    return torch.where(s == 1.0, cond, uncond + (cond - uncond) * s)


def autoguide_rows(
    guided: torch.Tensor, cond: torch.Tensor, guide: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Autoguidance on top of any classifier-free guidance: guided + (g - 1) (cond - guide) with g = scales (B,),
    where `guide` is a weaker model's conditional prediction. Alone (no CFG) it is guide + g (cond - guide), the
    CFG formula with the weaker model in the unconditional model's place; `guided` itself, bit for bit, where g = 1.
    """
    g = scales.to(guided.device, guided.dtype).reshape(-1, *([1] * (guided.dim() - 1)))
    return torch.where(g == 1.0, guided, guided + (cond - guide) * (g - 1))
