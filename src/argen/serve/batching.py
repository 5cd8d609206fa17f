"""Stacking decode states row-wise and taking rows back out: what lets strangers share one forward pass.

States of the same model hold rows that one forward pass can serve together: every per-row tensor is concatenated
along the batch dimension (tokens, filled, commit ranks, the condition, the order's extras and the KV cache), and
a request's rows are taken back out when it leaves. States at the same step stack for every order; states at
different steps stack for orders that read each row's progress from the state itself (`OrderSpec.row_steps`:
raster, masked, random-order). Nothing here changes a row's values, so a request's logits do not depend on its
neighbours (up to the float kernels' batch invariance, which `tests/serve` checks bit for bit).

A cache type is stackable when it has an entry in `CACHES`; a state whose cache is not (or whose rows depend on
the rest of the batch, like a ScaleKV budget that picks its layers from batch-averaged attention) runs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from argen.models.interface import Condition, DecodeState
from argen.models.kv_cache import KVCache
from argen.models.scale_cache import ScaleKVCache

Rows = torch.Tensor  # (n,) int64 row indices


def _cat_value(values: list[Any], rows: list[int]) -> Any:
    """One extra (or cache field) of each state -> the stacked value. Per-row tensors (leading dim = the state's
    rows) are concatenated, lists of them element by element; anything else must be the same in every state."""
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == rows[0]:
        return torch.cat(values)
    if isinstance(first, list) and first and isinstance(first[0], torch.Tensor):
        return [_cat_value([v[i] for v in values], rows) for i in range(len(first))]
    if first is None:
        assert all(v is None for v in values), "a batch-wide value is None in one state and set in another"
        return None
    assert all(_same(v, first) for v in values[1:]), "batch-wide values differ between stacked states"
    return first


def _take_value(value: Any, rows: Rows, total: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[rows]
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [_take_value(v, rows, total) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _cat_scale(caches: list[ScaleKVCache], rows: list[int]) -> ScaleKVCache:
    first = caches[0]
    out = ScaleKVCache(len(first.keys), first.budget, first.num_drafters)
    out.keys = _cat_value([c.keys for c in caches], rows)
    out.values = _cat_value([c.values for c in caches], rows)
    out.peak = max(c.peak for c in caches)
    return out


def _take_scale(cache: ScaleKVCache, rows: Rows) -> ScaleKVCache:
    out = ScaleKVCache(len(cache.keys), cache.budget, cache.num_drafters)
    total = next((k.shape[0] for k in cache.keys if k is not None), 0)
    out.keys = [None if k is None else _take_value(k, rows, total) for k in cache.keys]
    out.values = [None if v is None else _take_value(v, rows, total) for v in cache.values]
    out.peak = cache.peak
    return out


# cache type -> (stack, take rows, whether a state with this cache may share a batch)
CACHES: dict[type, tuple[Callable, Callable, Callable[[Any], bool]]] = {
    KVCache: (lambda caches, rows: KVCache.cat(caches), KVCache.take, lambda cache: True),
    # ScaleKV chooses its "drafter" layers from attention averaged over the whole batch: a budgeted cache's rows
    # depend on their neighbours, so such a state runs alone.
    ScaleKVCache: (_cat_scale, _take_scale, lambda cache: cache.budget == 0),
}


def stackable(state: DecodeState) -> bool:
    """Whether this state's rows may share a forward pass with other requests' rows."""
    if state.cache is None:
        return True
    entry = CACHES.get(type(state.cache))
    return entry is not None and entry[2](state.cache)


def stack(states: list[DecodeState], aligned: bool = True) -> DecodeState:
    """States -> one state holding all their rows, in order. aligned: they stand at the same step (any order);
    otherwise the stacked state's own step is not read (each request keeps its own: `rows`)."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    if aligned:
        assert all(s.step == first.step and s.num_steps == first.num_steps for s in states), "states must align"
    rows = [len(s.tokens) for s in states]
    condition = states[0].condition
    for s in states[1:]:
        condition = Condition(
            torch.cat([condition.class_ids, s.condition.class_ids]),
            torch.cat([condition.null_mask, s.condition.null_mask]),
        )
    cache = None
    if first.cache is not None:
        cache = CACHES[type(first.cache)][0]([s.cache for s in states], rows)
    extra = {key: _cat_value([s.extra[key] for s in states], rows) for key in first.extra}
    return DecodeState(
        condition,
        torch.cat([s.tokens for s in states]),
        torch.cat([s.filled for s in states]),
        step=first.step,
        num_steps=first.num_steps,
        cache=cache,
        extra=extra,
        extra_passes=first.extra_passes,
        rank=None if first.rank is None else torch.cat([s.rank for s in states]),
    )


def take(state: DecodeState, rows: Rows) -> DecodeState:
    """The state of some rows (n,) of a stacked state (a request leaving the batch)."""
    total = len(state.tokens)
    cache = None if state.cache is None else CACHES[type(state.cache)][1](state.cache, rows)
    return DecodeState(
        state.condition.rows(rows),
        state.tokens[rows],
        state.filled[rows],
        step=state.step,
        num_steps=state.num_steps,
        cache=cache,
        extra={key: _take_value(value, rows, total) for key, value in state.extra.items()},
        extra_passes=state.extra_passes,
        rank=None if state.rank is None else state.rank[rows],
    )


def rows(state: DecodeState, lo: int, hi: int, step: int, num_steps: int) -> DecodeState:
    """Rows lo..hi of a stacked state as a request's own state at its own step: tokens, filled, the extras and the
    cache are views, so a request's `advance` writes into the stacked state. What its policy, its guidance and the
    order's `advance` read, as they would alone."""
    total = len(state.tokens)
    return DecodeState(
        state.condition.rows(slice(lo, hi)),
        state.tokens[lo:hi],
        state.filled[lo:hi],
        step=step,
        num_steps=num_steps,
        cache=None,  # a request's rows predict only through the stacked state
        extra={key: _view_value(value, lo, hi, total) for key, value in state.extra.items()},
        extra_passes=state.extra_passes,
        rank=None if state.rank is None else state.rank[lo:hi],
    )


def _view_value(value: Any, lo: int, hi: int, total: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[lo:hi]
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [_view_value(v, lo, hi, total) for v in value]
    return value
