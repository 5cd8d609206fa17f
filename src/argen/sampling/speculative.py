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

Blocks follow each sample's generation order: raster's positions in turn, or the random order's per-sample
permutation (drawn by its position policy from the sample's generator, as the plain sampler draws it; the model
verifies drafted positions along the commit order). A batch is decoded together: every forward pass checks each
sample's block at that sample's own place in its order (acceptance lengths differ), while drafting and
acceptance use the sample's own random generator, so a seed gives the same image whatever the batch. Guidance
rows (conditional, unconditional) of one sample share tokens, as in the plain sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from argen.errors import ConfigError
from argen.models.interface import Condition, DecodeState, Generator, as_condition
from argen.sampling import guidance
from argen.sampling.config import SamplerConfig, Speculative
from argen.sampling.logits import check_finite, process
from argen.sampling.positions import policy_class
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


def _device_of(g: torch.Generator | None) -> torch.device:
    """Draws are made where the sample's generator lives (a CUDA generator cannot fill a CPU tensor)."""
    return g.device if g is not None else torch.device("cpu")


def _sample(probs: torch.Tensor, g: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """(n, V) probabilities -> (n,) draws by inverse CDF, one uniform per row (argmax when greedy)."""
    if greedy:
        return probs.argmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(probs), 1, generator=g, dtype=torch.float64, device=_device_of(g)).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[-1] - 1)


def _probs(logits: torch.Tensor, positions: range, num_steps: int, schedule, config) -> torch.Tensor:
    """(rows, n, V) logits of the target/draft at `positions` -> (n, V) sampling distribution of the sample."""
    check_finite(logits, f"logits at positions {positions.start}..{positions.stop - 1}")
    if schedule is not None:
        logits = guidance.guide_rows(logits, guidance.position_scales(schedule, positions, num_steps)[None])
    return process(logits, config.temperature, config.top_k, config.top_p)[0].float().softmax(-1)


def _accept(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    g,
    config: SamplerConfig,
    stats: SpeculativeStats,
    neighbours,
) -> torch.Tensor:
    """Speculative acceptance of drafts (k,) drawn from q (k, V) against the target p (k+1, V); relaxed over
    each draft's `neighbours` (LANTERN) when given. Returns the new tokens (between 1 and k+1 of them)."""
    k, greedy = len(drafts), config.greedy
    rows = torch.arange(k, device=p.device)
    if greedy:
        keep = drafts == p[:k].argmax(-1)
    else:
        u = torch.rand(k, generator=g, dtype=torch.float64, device=_device_of(g)).to(p.device)
        if neighbours is None:
            p_d, q_d = p[rows, drafts], q[rows, drafts]
        else:
            p_d, q_d = relaxed_mass(drafts, p[:k], q, neighbours, config.acceleration.relax_delta)
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
    u = torch.rand(len(old), generator=g, dtype=torch.float64, device=_device_of(g)).to(old.device)
    keep = u * q_old[rows, old].double() < p_new[rows, old].double()
    residual = (p_new - q_old).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_new)
    return torch.where(keep, old, _sample(residual, g, greedy=False))


@dataclass
class _Progress:
    """One sample: tokens chosen so far, its current drafts and the distributions they were drawn from, and how
    many leading positions of the draft model's cache hold entries computed from chosen tokens."""

    rows: list[int]  # its rows in the batch: conditional (and unconditional when guided)
    g: torch.Generator | None
    drafts: torch.Tensor
    q: torch.Tensor
    n: int = 0
    draft_valid: int = 0


def _jacobi_drafts(s: _Progress, k: int, V: int) -> None:
    """Keep the first k carried drafts; positions never predicted yet start from uniform random tokens."""
    if len(s.drafts) < k:
        extra = k - len(s.drafts)
        s.drafts = torch.cat(
            [s.drafts, torch.randint(V, (extra,), generator=s.g, device=_device_of(s.g)).to(s.drafts.device)]
        )
        s.q = torch.cat([s.q, torch.full((extra, V), 1.0 / V, device=s.q.device)])
    s.drafts, s.q = s.drafts[:k], s.q[:k]


def _next_jacobi_drafts(s: _Progress, p: torch.Tensor, m: int, k: int, config) -> None:
    """Jacobi: the target's predictions p (k+1, V) for the positions after the m new tokens become the drafts."""
    fresh = _sample(p[m:], s.g, config.greedy) if m <= k else s.drafts[:0]
    if config.acceleration.method == "mc-sjd" and m < k and not config.greedy:
        # Maximal coupling: keep the old draft of a position whenever the new distribution allows it, so drafts
        # settle instead of being redrawn every pass (each is still distributed as p).
        fresh[: k - m] = _couple(s.drafts[m:], s.q[m:], p[m:k], s.g)
    s.q, s.drafts = p[m:], fresh


def _propose(draft_model, dstate, progress: list[_Progress], ks: list[int], L, schedule, config, stats) -> None:
    """The draft model proposes each sample's k tokens autoregressively, all samples in one pass per token."""
    device = dstate.tokens.device
    proposals = [[] for _ in progress]
    dists = [[] for _ in progress]
    for j in range(max(ks, default=0)):
        active = [s.n + j if j < k else None for s, k in zip(progress, ks, strict=True)]
        # a pass feeds every position from the first stale cache entry on (two after a fully accepted block)
        span = max((p - s.draft_valid + 1 for s, p in zip(progress, active, strict=True) if p is not None))
        starts = torch.empty(len(dstate.tokens), dtype=torch.long, device=device)
        at = []  # where each sample's position sits in its block
        for s, p in zip(progress, active, strict=True):
            end = p if p is not None else max(s.draft_valid - 1, 0)  # idle rows rewrite a valid entry
            start = max(end - span + 1, 0)
            starts[s.rows] = start
            at.append(end - start)
        logits = draft_model.predict(dstate, _block(starts, span)).logits
        stats.draft_passes += 1
        for i, (s, p) in enumerate(zip(progress, active, strict=True)):
            if p is None:
                continue
            dist = _probs(logits[s.rows, at[i] : at[i] + 1], range(p, p + 1), L, schedule, config)
            token = _sample(dist, s.g, config.greedy)
            dstate.tokens[s.rows, p] = token
            dstate.filled[s.rows, p] = True
            proposals[i].append(token)
            dists[i].append(dist)
            s.draft_valid = p + 1
    for s, k, tokens, q in zip(progress, ks, proposals, dists, strict=True):
        s.drafts = torch.cat(tokens) if k else s.drafts[:0]
        s.q = torch.cat(q) if k else s.q[:0]


def _block(starts: torch.Tensor, length: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) first indices -> (R, length) positions of each row's block: consecutive, or along `order` (R, L)."""
    block = starts[:, None] + torch.arange(length, device=starts.device)
    return block if order is None else order.gather(1, block)


def _write(state: DecodeState, rows: list[int], order: torch.Tensor, start: int, values: torch.Tensor) -> None:
    """Put (n,) values (drafts or accepted tokens) at the sample's order positions start..start+n of its rows,
    numbered start.. in commit order; what comes after in its order is not filled (a draft not accepted must not
    be read as a chosen token)."""
    rows_ = torch.tensor(rows, device=order.device)[:, None]
    positions = order[start : start + len(values)]
    state.tokens[rows_, positions] = values
    state.filled[rows_, positions] = True
    state.filled[rows_, order[start + len(values) :]] = False
    if state.rank is not None:
        state.rank[rows_, positions] = torch.arange(start, start + len(values), device=order.device)


@torch.no_grad()
def generate_speculative(
    model: Generator,
    condition: Condition,
    config: SamplerConfig,
    generators: list | None,
    schedule: guidance.Schedule | None,
    draft_model: Generator | None = None,
    stats: SpeculativeStats | None = None,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """B conditions -> ids (B, seq_len), distributed exactly as the plain sampler's (greedy: identical ids),
    unless `relax_k` relaxes the acceptance over the nearest codes of `codebook` (V, d) (LANTERN)."""
    condition = as_condition(condition)
    spec: Speculative = config.acceleration
    if spec.method == "draft":
        if draft_model is None:
            raise ConfigError("speculative='draft' needs a draft model (ARPipeline(..., draft=...) or draft_model=)")
        if (draft_model.vocab_size, draft_model.seq_len) != (model.vocab_size, model.seq_len):
            raise ConfigError("the draft model must share the target's vocabulary and sequence length")
    else:
        draft_model = None
    neighbours = None
    if spec.relax_k:
        if codebook is None:
            raise ConfigError("relaxed acceptance (relax_k) needs the tokenizer's codebook (codebook=)")
        if len(codebook) != model.vocab_size:
            raise ConfigError(f"the codebook has {len(codebook)} codes, the generator {model.vocab_size}")
        neighbours = code_neighbours(codebook, spec.relax_k)
    stats = stats if stats is not None else SpeculativeStats()
    B, L, V = len(condition), model.seq_len, model.vocab_size
    guided = schedule is not None
    rows = guidance.with_null_rows(condition) if guided else condition
    window = min(spec.window, L - 1)
    options = config.options_for(model.order)
    state = model.start(rows, options)
    if state.num_steps != L:
        raise ConfigError(
            f"speculative decoding verifies one position per draft: the order's {state.num_steps} parallel steps "
            "do not combine with it (unset steps)"
        )
    device = state.tokens.device
    # Each sample's generation order, drawn first from its generator as the plain sampler does (random order);
    # None: the raster order, position by position.
    policy = policy_class(model.order.policy)(model, options, B, generators)
    policy.begin(state)
    order = policy.order()
    if order is not None and draft_model is not None:
        raise ConfigError("speculative='draft' follows the raster order; the random order drafts with sjd or mc-sjd")
    order_of = order if order is not None else torch.arange(L, device=device).expand(B, L)
    row_order = None if order is None else order.to(device).repeat(len(rows) // B, 1)  # (R, L)
    dstate = draft_model.start(rows) if draft_model is not None else None
    # state.tokens: each row's chosen tokens, followed during a pass by its drafts
    empty = torch.empty(0, dtype=torch.long, device=device)
    progress = [
        _Progress(
            [b, b + B] if guided else [b],
            generators[b] if generators is not None else None,
            empty,
            torch.empty(0, V, device=device),
        )
        for b in range(B)
    ]
    while any(s.n < L for s in progress):
        ks = [min(window, L - 1 - s.n) if s.n < L else 0 for s in progress]
        if draft_model is None:
            for s, k in zip(progress, ks, strict=True):
                _jacobi_drafts(s, k, V)
        else:
            dstate.tokens.copy_(state.tokens)
            dstate.filled.copy_(state.filled)
            _propose(draft_model, dstate, progress, ks, L, schedule, config, stats)
        starts = torch.empty(len(rows), dtype=torch.long, device=device)
        for s in progress:
            if s.n < L:
                _write(state, s.rows, order_of[s.rows[0]], s.n, s.drafts)
            starts[s.rows] = min(s.n, L - 1 - window)  # a block always spans window + 1 positions
        logits = model.predict(state, _block(starts, window + 1, row_order)).logits  # (R, window + 1, V)
        stats.target_passes += 1
        for s, k in zip(progress, ks, strict=True):
            if s.n >= L:
                continue
            at = s.n - int(starts[s.rows[0]])
            p = _probs(logits[s.rows, at : at + k + 1], range(s.n, s.n + k + 1), L, schedule, config)  # (k+1, V)
            new = _accept(s.drafts, s.q, p, s.g, config, stats, neighbours)
            m = len(new)
            _write(state, s.rows, order_of[s.rows[0]], s.n, new)
            if draft_model is None:
                _next_jacobi_drafts(s, p, m, k, config)
            else:
                # draft-cache entries stay valid up to the last accepted draft's successor
                s.draft_valid = min(s.draft_valid, s.n + m)
            s.n += m
    return state.tokens[:B].clone()
