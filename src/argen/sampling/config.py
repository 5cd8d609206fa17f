"""Sampler settings in three parts: core sampling, the order's own options, and an acceleration strategy.

Core sampling (temperature, top-k/p, guidance) means the same for every order. The order's own options
(next-scale pruning, a mask schedule's steps) are a dataclass the order declares (`model.order.options_class`),
kept here as plain fields until the sampler meets the model. An acceleration computes the same (or a knowingly
relaxed) distribution with fewer sequential passes; each is a small dataclass naming the orders it fits.

Files and the CLI speak one flat namespace (`--set FIELD=V`, `pipeline.json`): `SamplerConfig.from_flat` routes
each field to its part and `flat()` writes it back, so old files keep loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from argen.errors import ConfigError
from argen.sampling import guidance


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Speculative:
    """Exact speculative sampling (`sampling/speculative.py`): drafts checked in one pass per block.
    method: "sjd" / "mc-sjd" (speculative Jacobi, training-free) or "draft" (a small draft model). relax_k > 0
    relaxes the acceptance over each draft's nearest codes (LANTERN; lossy), bounded by relax_delta."""

    name: ClassVar[str] = "speculative"
    method: str = "sjd"
    window: int = 8
    relax_k: int = 0
    relax_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in ("sjd", "mc-sjd", "draft"):
            raise ConfigError(f"speculative must be 'none', 'sjd', 'mc-sjd' or 'draft', got {self.method!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"window must be an integer >= 1, got {self.window!r}")
        _finite("relax_delta", self.relax_delta)
        if self.relax_k < 0 or not 0.0 <= self.relax_delta <= 1.0:
            raise ConfigError(
                f"relax_k must be >= 0 and relax_delta in [0, 1], got {self.relax_k}, {self.relax_delta}"
            )

    def flat(self) -> dict[str, Any]:
        return {
            "speculative": self.method,
            "window": self.window,
            "relax_k": self.relax_k,
            "relax_delta": self.relax_delta,
        }


@dataclass(frozen=True)
class ParallelRows:
    """Parallel decoding across rows (ZipAR; lossy): a row starts `window` tokens behind the one above."""

    name: ClassVar[str] = "parallel"
    window: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"parallel_window must be an integer >= 1 (0 = off), got {self.window!r}")

    def flat(self) -> dict[str, Any]:
        return {"parallel_window": self.window}


Acceleration = Speculative | ParallelRows
_SPECULATIVE_FIELDS = {"speculative", "window", "relax_k", "relax_delta"}


@dataclass
class SamplerConfig:
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = none, whatever the schedule
    cfg_schedule: str = "constant"  # a key of guidance.SCHEDULES: how the scale moves from 1 to cfg_scale
    # autoguidance (Karras et al. 2024): a weaker model of the same order (the pipeline's guide) is contrasted with
    # the conditional prediction, on the same schedule as cfg_scale; 1 = none
    guide_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = no filtering
    top_p: float = 1.0  # 1 = no filtering
    greedy: bool = False  # argmax instead of a draw
    order_options: dict[str, Any] = field(default_factory=dict)  # fields of the order's options class
    acceleration: Acceleration | None = None

    def __post_init__(self) -> None:
        for name in ("cfg_scale", "guide_scale", "temperature", "top_p"):
            _finite(name, getattr(self, name))
        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.guide_scale < 0:
            raise ConfigError(f"guide_scale must be >= 0 (1 = no autoguidance), got {self.guide_scale}")
        if self.cfg_schedule not in guidance.SCHEDULES:
            raise ConfigError(f"cfg_schedule {self.cfg_schedule!r} unknown; choose from {sorted(guidance.SCHEDULES)}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    # --- the flat namespace of files and the CLI ---

    CORE: ClassVar[tuple[str, ...]] = (
        "cfg_scale",
        "cfg_schedule",
        "guide_scale",
        "temperature",
        "top_k",
        "top_p",
        "greedy",
    )

    @classmethod
    def from_flat(cls, fields: dict[str, Any]) -> SamplerConfig:
        """{"cfg_scale": 2, "speculative": "sjd", "window": 16, "prune": 0.25, ...} -> a SamplerConfig. Fields that
        are neither core nor an acceleration's are the order's options, checked against the order by
        `options_for`."""
        core = {k: v for k, v in fields.items() if k in cls.CORE}
        spec = {k: v for k, v in fields.items() if k in _SPECULATIVE_FIELDS}
        parallel = fields.get("parallel_window", 0)
        order = {k: v for k, v in fields.items() if k not in (*cls.CORE, *_SPECULATIVE_FIELDS, "parallel_window")}
        method = spec.pop("speculative", "none")
        if method == "none":
            if spec.get("relax_k"):
                raise ConfigError("relax_k relaxes speculative acceptance: set speculative too")
            speculative = None
        else:
            speculative = Speculative(method=method, **spec)
        if parallel and speculative is not None:
            raise ConfigError("choose speculative or parallel decoding, not both")
        acceleration = ParallelRows(parallel) if parallel else speculative
        return cls(**core, order_options=order, acceleration=acceleration)

    def flat(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.CORE}
        out.update(self.order_options)
        if self.acceleration is not None:
            out.update(self.acceleration.flat())
        return out

    def with_overrides(self, **fields: Any) -> SamplerConfig:
        """This config with some flat fields replaced (`pipe(..., top_k=50, speculative="sjd")`)."""
        return SamplerConfig.from_flat({**self.flat(), **fields})

    # --- meeting the model ---

    def options_for(self, order: Any) -> Any:
        """The order's options object (`order`: a model's `OrderSpec`); an option the order does not have is an
        error naming the ones it has."""
        known = {f.name for f in dataclasses.fields(order.options_class)}
        unknown = sorted(set(self.order_options) - known)
        if unknown:
            own = f"its own are {sorted(known)}" if known else "it has none of its own"
            common = sorted([*self.CORE, *_SPECULATIVE_FIELDS, "parallel_window"])
            raise ConfigError(
                f"unknown sampler setting(s) {unknown} for the {order.name} order ({own}); the common ones are "
                f"{common}{_did_you_mean(unknown, [*sorted(known), *common])}"
            )
        return order.options_class(**self.order_options)

    def schedule(self) -> guidance.Schedule | None:
        """The guidance scale as a function of progress, or None when there is no guidance to compute."""
        if self.cfg_scale == 1.0:
            return None
        return guidance.SCHEDULES[self.cfg_schedule](self.cfg_scale)

    def guide_schedule(self) -> guidance.Schedule | None:
        """The autoguidance scale as a function of progress (the shape of `cfg_schedule`), or None without it."""
        if self.guide_scale == 1.0:
            return None
        return guidance.SCHEDULES[self.cfg_schedule](self.guide_scale)


def _did_you_mean(unknown: list[str], names: list[str]) -> str:
    """'; did you mean cfg_scale (for cfg)?' for `cfg` (the CLI's flag is --cfg, the field cfg_scale), or ''."""
    hints = []
    for name in unknown:
        near = [n for n in names if n.startswith(name)] or difflib.get_close_matches(name, names, n=1)
        hints += [f"{near[0]} (for {name})"] if near else []
    return f"; did you mean {', '.join(hints)}?" if hints else ""
