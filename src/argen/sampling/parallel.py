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

from argen.models.interface import Generator
from argen.sampling import guidance
from argen.sampling.logits import check_finite, draw, process


@torch.no_grad()
def generate_parallel(
    model: Generator,
    labels: torch.Tensor,
    config,
    generators: list | None,
    schedule: guidance.Schedule | None,
    window: int,
) -> torch.Tensor:
    """labels (B,) -> ids (B, seq_len)."""
    if not hasattr(model, "predict_at"):
        raise ValueError(
            f"{type(model).__name__} cannot decode several rows at once: parallel decoding needs a "
            "raster-order generator"
        )
    width = model.config.grid_size
    window = min(window, width)
    B, L = labels.shape[0], model.seq_len
    rows = guidance.with_null_rows(labels, model.num_classes) if schedule is not None else labels
    state = model.start(rows)
    done = [0] * width  # tokens decoded per image row
    while done[-1] < width:
        ready = [
            r for r in range(width) if done[r] < width and (r == 0 or done[r - 1] >= min(done[r] + window, width))
        ]
        targets = torch.tensor([r * width + done[r] for r in ready], device=rows.device)
        # The token before each target in raster order; for the first token of a row started early, the latest
        # decoded token of the row above (the same thing once that row is complete). Target 0 reads the class.
        before = [r * width + done[r] - 1 if done[r] else max((r - 1) * width + done[r - 1] - 1, 0) for r in ready]
        inputs = state.tokens[:, before]
        logits = model.predict_at(state, targets, inputs)  # (rows, n, V)
        check_finite(logits, f"logits at positions {targets.tolist()}")
        if schedule is not None:
            logits = guidance.guide(logits, guidance.position_scales(schedule, targets.tolist(), L))
        ids = draw(process(logits, config.temperature, config.top_k, config.top_p), generators, config.greedy)
        state.tokens[:, targets] = ids.repeat(len(rows) // B, 1)
        for r in ready:
            done[r] += 1
        state.step = sum(done)
    return state.tokens[:B]
