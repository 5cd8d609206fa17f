"""Lossless speculative sampling for orders that can verify a drafted block in one forward pass.

Two drafters share one acceptance rule (Leviathan et al. 2023; Chen et al. 2023): a drafted token d drawn from
q is kept with probability min(1, p(d) / q(d)); at the first rejection the token is redrawn from
norm(max(0, p - q)). Whatever q is, the kept tokens are distributed exactly as the target p.

- `sjd`: Speculative Jacobi Decoding (Teng et al. 2024), training-free. The drafts of the next iteration are
  the target's own predictions for the positions after the accepted prefix (made in the same pass, conditioned
  on the older drafts); positions never predicted yet start from uniform random tokens.
- `draft`: a small generator of the same order proposes the block autoregressively.

Samples are decoded one at a time (acceptance lengths differ per sample); guidance rows (conditional,
unconditional) of one sample share tokens, as in the plain sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from argen.models.interface import Generator
from argen.sampling import guidance
from argen.sampling.logits import check_finite, process


@dataclass
class SpeculativeStats:
    target_passes: int = 0
    draft_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _uniform(g: torch.Generator | None) -> float:
    return torch.rand(1, generator=g).item()


def _sample(probs: torch.Tensor, g: torch.Generator | None, greedy: bool) -> int:
    """One draw from (V,) probabilities by inverse CDF (one uniform per token, as the plain sampler)."""
    if greedy:
        return int(probs.argmax())
    cdf = probs.double().cumsum(0)
    return int(torch.searchsorted(cdf, _uniform(g) * cdf[-1]).clamp(max=len(probs) - 1))


def _probs(logits: torch.Tensor, positions: range, num_steps: int, schedule, config) -> torch.Tensor:
    """(rows, n, V) logits of the target/draft at `positions` -> (n, V) sampling distribution of the sample."""
    check_finite(logits, f"logits at positions {positions.start}..{positions.stop - 1}")
    if schedule is not None:
        cond, uncond = logits.chunk(2, dim=0)
        scale = torch.tensor([schedule(p / max(num_steps - 1, 1)) for p in positions], device=logits.device)
        logits = uncond + (cond - uncond) * scale[None, :, None]
    return process(logits, config.temperature, config.top_k, config.top_p)[0].float().softmax(-1)


def _accept(
    drafts: list[int], qs: list[torch.Tensor], p: torch.Tensor, g, greedy: bool, stats: SpeculativeStats
) -> list[int]:
    """Speculative acceptance of drafts (k) against target rows p (k+1, V); returns the new tokens (1..k+1)."""
    out = []
    for j, d in enumerate(drafts):
        stats.drafted += 1
        keep = d == int(p[j].argmax()) if greedy else _uniform(g) * qs[j][d].item() < p[j, d].item()
        if keep:
            stats.accepted += 1
            out.append(d)
            continue
        residual = (p[j] - qs[j]).clamp(min=0)
        out.append(_sample(p[j] if greedy or residual.sum() <= 0 else residual / residual.sum(), g, greedy))
        return out
    out.append(_sample(p[len(drafts)], g, greedy))  # every draft kept: one more token for free
    return out


def _rows(labels: torch.Tensor, model: Generator, guided: bool) -> torch.Tensor:
    return torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels


def _one_sample(
    model: Generator, label: torch.Tensor, config, g, schedule, window: int, draft_model, stats: SpeculativeStats
) -> torch.Tensor:
    L, V = model.seq_len, model.vocab_size
    rows = _rows(label, model, schedule is not None)
    state = model.start(rows)
    dstate = draft_model.start(rows) if draft_model is not None else None
    drafts, qs = [], []  # the Jacobi drafts carried between iterations (sjd)
    uniform = torch.full((V,), 1.0 / V, device=rows.device)
    while state.step < L:
        n = state.step
        k = min(window, L - n - 1)
        if draft_model is None:
            while len(drafts) < k:  # positions not predicted yet: uniform random initialisation
                drafts.append(int(torch.randint(V, (1,), generator=g)))
                qs.append(uniform)
            drafts, qs = drafts[:k], qs[:k]
        else:
            drafts, qs = [], []
            for j in range(k):
                q = _probs(draft_model.predict(dstate), range(n + j, n + j + 1), L, schedule, config)[0]
                stats.draft_passes += 1
                drafts.append(_sample(q, g, config.greedy))
                qs.append(q)
                draft_model.advance(dstate, torch.tensor([[drafts[-1]]] * len(rows), device=rows.device))
        block = torch.tensor([drafts] * len(rows), dtype=torch.long, device=rows.device).view(len(rows), k)
        p = _probs(model.verify(state, block), range(n, n + k + 1), L, schedule, config)  # (k+1, V)
        stats.target_passes += 1
        new = _accept(drafts, qs, p, g, config.greedy, stats)
        m = len(new)
        chosen = torch.cat([state.tokens[:1, :n], torch.tensor([new], device=rows.device)], dim=1)
        model.rewind(state, chosen.expand(len(rows), -1))
        if draft_model is not None:
            if m <= k:
                draft_model.rewind(dstate, chosen.expand(len(rows), -1))
            else:  # the bonus token's input position was never fed to the draft model: feed it now
                draft_model.rewind(dstate, chosen[:, :-1].expand(len(rows), -1))
                draft_model.predict(dstate)
                stats.draft_passes += 1
                draft_model.advance(dstate, chosen[:, -1:].expand(len(rows), -1))
        else:
            # Jacobi: the target's predictions for the positions after the new prefix become the next drafts.
            drafts = [_sample(p[j], g, config.greedy) for j in range(m, k + 1)]
            qs = [p[j] for j in range(m, k + 1)]
    return state.tokens[:1]


@torch.no_grad()
def generate_speculative(
    model: Generator,
    labels: torch.Tensor,
    config,
    generators: list | None,
    schedule: guidance.Schedule | None,
    draft_model: Generator | None = None,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """labels (B,) -> ids (B, seq_len), distributed exactly as the plain sampler's (greedy: identical ids)."""
    if not hasattr(model, "verify"):
        raise ValueError(
            f"{type(model).__name__} cannot verify drafted blocks: speculative decoding needs a raster-order generator"
        )
    if config.speculative == "draft":
        if draft_model is None:
            raise ValueError("speculative='draft' needs a draft model (ARPipeline(..., draft=...) or draft_model=)")
        if (draft_model.vocab_size, draft_model.seq_len) != (model.vocab_size, model.seq_len):
            raise ValueError("the draft model must share the target's vocabulary and sequence length")
    else:
        draft_model = None
    stats = stats if stats is not None else SpeculativeStats()
    out = []
    for b in range(labels.shape[0]):
        g = generators[b] if generators is not None else None
        out.append(_one_sample(model, labels[b : b + 1], config, g, schedule, config.window, draft_model, stats))
    return torch.cat(out)
