"""Lossless speculative sampling for orders that can verify a drafted block in one forward pass.

Two drafters share one acceptance rule (Leviathan et al. 2023; Chen et al. 2023): a drafted token d drawn from
q is kept with probability min(1, p(d) / q(d)); at the first rejection the token is redrawn from
norm(max(0, p - q)). Whatever q is, the kept tokens are distributed exactly as the target p.

- `sjd`: Speculative Jacobi Decoding (Teng et al. 2024), training-free. The drafts of the next iteration are
  the target's own predictions for the positions after the accepted prefix (made in the same pass, conditioned
  on the older drafts); positions never predicted yet start from uniform random tokens.
- `mc-sjd`: the same, but a position's new draft is maximally coupled with its previous one (kept whenever the
  new prediction allows), so drafts stop changing once the context settles.
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
from argen.sampling.relaxed import code_neighbours, relaxed_mass


@dataclass
class SpeculativeStats:
    target_passes: int = 0
    draft_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _sample(probs: torch.Tensor, g: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """(n, V) probabilities -> (n,) draws by inverse CDF, one uniform per row (argmax when greedy)."""
    if greedy:
        return probs.argmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(probs), 1, generator=g, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[-1] - 1)


def _probs(logits: torch.Tensor, positions: range, num_steps: int, schedule, config) -> torch.Tensor:
    """(rows, n, V) logits of the target/draft at `positions` -> (n, V) sampling distribution of the sample."""
    check_finite(logits, f"logits at positions {positions.start}..{positions.stop - 1}")
    if schedule is not None:
        logits = guidance.guide(logits, guidance.position_scales(schedule, positions, num_steps))
    return process(logits, config.temperature, config.top_k, config.top_p)[0].float().softmax(-1)


def _accept(
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, g, config, stats: SpeculativeStats, neighbours
) -> torch.Tensor:
    """Speculative acceptance of drafts (k,) drawn from q (k, V) against the target p (k+1, V); relaxed over
    each draft's `neighbours` (LANTERN) when given. Returns the new tokens (between 1 and k+1 of them)."""
    k, greedy = len(drafts), config.greedy
    rows = torch.arange(k, device=p.device)
    if greedy:
        keep = drafts == p[:k].argmax(-1)
    else:
        u = torch.rand(k, generator=g, dtype=torch.float64).to(p.device)
        if neighbours is None:
            p_d, q_d = p[rows, drafts], q[rows, drafts]
        else:
            p_d, q_d = relaxed_mass(drafts, p[:k], q, neighbours, config.relax_delta)
        keep = u * q_d.double() < p_d.double()  # kept with probability min(1, p/q)
    rejected = (~keep).nonzero()
    m = int(rejected[0]) if len(rejected) else k  # drafts kept before the first rejection
    stats.drafted += min(m + 1, k)
    stats.accepted += m
    if m == k:  # every draft kept: the target's next token comes for free
        return torch.cat([drafts, _sample(p[k : k + 1], g, greedy)])
    residual = (p[m] - q[m]).clamp(min=0)
    fix = p[m] if greedy or residual.sum() <= 0 else residual / residual.sum()
    return torch.cat([drafts[:m], _sample(fix[None], g, greedy)])


def _couple(old: torch.Tensor, q_old: torch.Tensor, p_new: torch.Tensor, g) -> torch.Tensor:
    """Maximal coupling of (n,) tokens drawn from q_old (n, V) with p_new (n, V): keep a token with probability
    min(1, p_new / q_old), otherwise redraw from norm(max(0, p_new - q_old)); the result is distributed as p_new."""
    rows = torch.arange(len(old), device=old.device)
    u = torch.rand(len(old), generator=g, dtype=torch.float64).to(old.device)
    keep = u * q_old[rows, old].double() < p_new[rows, old].double()
    residual = (p_new - q_old).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_new)
    return torch.where(keep, old, _sample(residual, g, greedy=False))


def _rows(labels: torch.Tensor, model: Generator, guided: bool) -> torch.Tensor:
    return torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels


def _one_sample(
    model: Generator,
    label: torch.Tensor,
    config,
    g,
    schedule,
    window: int,
    draft_model,
    stats: SpeculativeStats,
    neighbours: torch.Tensor | None,
) -> torch.Tensor:
    L, V = model.seq_len, model.vocab_size
    rows = _rows(label, model, schedule is not None)
    R, device = len(rows), rows.device
    state = model.start(rows)
    dstate = draft_model.start(rows) if draft_model is not None else None
    # The Jacobi drafts carried between iterations (sjd) and the distributions they were drawn from.
    drafts = torch.empty(0, dtype=torch.long, device=device)
    q = torch.empty(0, V, device=device)
    while state.step < L:
        n = state.step
        k = min(window, L - n - 1)
        if draft_model is None:
            if len(drafts) < k:  # positions not predicted yet: uniform random initialisation
                extra = k - len(drafts)
                drafts = torch.cat([drafts, torch.randint(V, (extra,), generator=g).to(device)])
                q = torch.cat([q, torch.full((extra, V), 1.0 / V, device=device)])
            drafts, q = drafts[:k], q[:k]
        else:
            proposals, dists = [], []
            for j in range(k):
                dist = _probs(draft_model.predict(dstate), range(n + j, n + j + 1), L, schedule, config)
                stats.draft_passes += 1
                proposals.append(_sample(dist, g, config.greedy))
                dists.append(dist)
                draft_model.advance(dstate, proposals[-1].expand(R, 1))
            drafts = torch.cat(proposals) if proposals else drafts[:0]
            q = torch.cat(dists) if dists else q[:0]
        p = _probs(model.verify(state, drafts.expand(R, k)), range(n, n + k + 1), L, schedule, config)  # (k+1, V)
        stats.target_passes += 1
        new = _accept(drafts, q, p, g, config, stats, neighbours)
        m = len(new)
        chosen = torch.cat([state.tokens[:1, :n], new[None]], dim=1)  # (1, n + m)
        model.rewind(state, chosen.expand(R, -1))
        if draft_model is None:
            # Jacobi: the target's predictions for the positions after the new prefix become the next drafts.
            fresh = _sample(p[m:], g, config.greedy) if m <= k else drafts[:0]
            if config.speculative == "mc-sjd" and m < k and not config.greedy:
                # Maximal coupling: keep the old draft of a position whenever the new distribution allows it, so
                # drafts settle instead of being redrawn every pass (each is still distributed as p exactly).
                fresh[: k - m] = _couple(drafts[m:], q[m:], p[m:k], g)
            q = p[m:]
            drafts = fresh
        elif m <= k:
            draft_model.rewind(dstate, chosen.expand(R, -1))
        else:  # the bonus token's input position was never fed to the draft model: feed it now
            draft_model.rewind(dstate, chosen[:, :-1].expand(R, -1))
            draft_model.predict(dstate)
            stats.draft_passes += 1
            draft_model.advance(dstate, chosen[:, -1:].expand(R, -1))
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
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """labels (B,) -> ids (B, seq_len), distributed exactly as the plain sampler's (greedy: identical ids),
    unless `config.relax_k` relaxes the acceptance over the nearest codes of `codebook` (V, d) (LANTERN)."""
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
    neighbours = None
    if config.relax_k:
        if codebook is None:
            raise ValueError("relaxed acceptance (relax_k) needs the tokenizer's codebook (codebook=)")
        if len(codebook) != model.vocab_size:
            raise ValueError(f"the codebook has {len(codebook)} codes, the generator {model.vocab_size}")
        neighbours = code_neighbours(codebook, config.relax_k)
    stats = stats if stats is not None else SpeculativeStats()
    out = []
    for b in range(labels.shape[0]):
        g = generators[b] if generators is not None else None
        out.append(
            _one_sample(model, labels[b : b + 1], config, g, schedule, config.window, draft_model, stats, neighbours)
        )
    return torch.cat(out)
