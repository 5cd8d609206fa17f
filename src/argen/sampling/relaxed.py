"""Relaxed speculative acceptance (LANTERN, Jang et al. 2025): lossy, opt-in.

Image tokens are interchangeable far more often than words: a draft whose code vector is close to the token
the target prefers decodes to almost the same pixels, yet exact acceptance rejects it whenever its own
probability is low. LANTERN accepts a draft x with probability min(1, p(A) / q(A)) instead of
min(1, p(x) / q(x)), where A is x together with its nearest codes in the tokenizer's latent space (at most
`relax_k` of them, by cosine similarity), taken in order of closeness while the target probability they
lend to x stays below `relax_delta` (which bounds the total variation between p and the relaxed target).
relax_k = 0 is exact speculative decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def code_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, d) code vectors -> (V, k) ids of each code's k nearest other codes, closest first (cosine)."""
    if not 0 < k < len(codebook):
        raise ValueError(f"relax_k must be in 1..{len(codebook) - 1} for a codebook of {len(codebook)}, got {k}")
    unit = F.normalize(codebook.float(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=-1).indices


def relaxed_mass(
    drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts (n,), target p and draft q (n, V) -> p(A), q(A) (n,) over each draft's acceptance set A."""
    rows = torch.arange(len(drafts), device=p.device)[:, None]
    near = neighbours[drafts]  # (n, k)
    lent = p[rows, near]
    take = lent.cumsum(-1) < delta  # a prefix: the closest codes whose summed mass stays below delta
    p_set = p[rows[:, 0], drafts] + (lent * take).sum(-1)
    q_set = q[rows[:, 0], drafts] + (q[rows, near] * take).sum(-1)
    return p_set, q_set
