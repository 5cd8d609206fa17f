"""Parallel decoding across rows for raster-order generators (after ZipAR, He et al. 2024). Lossy.

Images are locally dependent, so a row need not wait for the whole previous row: token (r, c) is decoded as
soon as row r-1 holds its first min(c + window, width) tokens. Every pass decodes the next token of each row
that is ready, so a g x g grid takes about g + (g - 1) * window passes instead of g^2; window = width is plain
raster decoding. Where raster order would read a token that is not decoded yet (the first token of a row
started early reads the end of the previous row), the latest decoded token of that row stands in, and each
query attends only to the tokens already decoded.
"""

from __future__ import annotations

import torch

from argen.models.interface import Condition, Generator, as_condition
from argen.sampling import guidance
from argen.sampling.config import SamplerConfig
from argen.sampling.logits import check_finite, draw, process


@torch.no_grad()
def generate_parallel(
    model: Generator,
    condition: Condition,
    config: SamplerConfig,
    generators: list | None,
    schedule: guidance.Schedule | None,
    window: int,
) -> torch.Tensor:
    """B conditions -> ids (B, seq_len). The stand-in for a token not decoded yet is the model's rule for a
    position whose predecessor is not filled (the nearest filled token before it)."""
    condition = as_condition(condition)
    height, width = model.token_grid
    window = min(window, width)
    B, L = len(condition), model.seq_len
    rows = guidance.with_null_rows(condition) if schedule is not None else condition
    state = model.start(rows)
    done = [0] * height  # tokens decoded per image row
    while done[-1] < width:
        ready = [
            r for r in range(height) if done[r] < width and (r == 0 or done[r - 1] >= min(done[r] + window, width))
        ]
        targets = torch.tensor([r * width + done[r] for r in ready], device=state.tokens.device)
        positions = targets.expand(len(rows), -1)
        logits = model.predict(state, positions).logits  # (rows, n, V)
        check_finite(logits, f"logits at positions {targets.tolist()}")
        if schedule is not None:
            logits = guidance.guide_rows(logits, guidance.position_scales(schedule, targets.tolist(), L)[None])
        ids = draw(process(logits, config.temperature, config.top_k, config.top_p), generators, config.greedy)
        model.advance(state, positions, ids.repeat(len(rows) // B, 1))
        for r in ready:
            done[r] += 1
    return state.tokens[:B]
