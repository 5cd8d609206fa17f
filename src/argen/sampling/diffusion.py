"""The diffusion head's sampling loop (MAR §3.3; DDPM ancestral sampling over IDDPM-respaced steps).

The head is a callable `head(x_t (N, C), t (N,), z (N, Dz)) -> (N, 2C)` (the predicted noise, then the variance
values), DiT's pattern: the loop owns the process, the network only predicts. Classifier-free guidance is
applied to the noise prediction (MAR's `forward_with_cfg`), with the conditional rows' variance, and so is
autoguidance (a weaker model's head on the same x_t); the
temperature scales the noise of every step (MAR §3.3, their "temperature" tau). Noise comes from a function
of the draw index, so that each sample draws from its own generator (`per_sample_noise`) and tests can feed
recorded draws back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from argen.diffusion import DiffusionSchedule
from argen.sampling.guidance import autoguide_rows, guide_rows

if TYPE_CHECKING:  # values imports this module
    from argen.sampling.values import StepRows

Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[int], torch.Tensor]  # draw index (0: x_T; i: the noise added by the i-th step) -> (N, C)


@dataclass
class RowGroup:
    """Rows of one head loop that run their own respaced process (a server's requests at different AR steps under
    DiSA): `rows` (N_j,) index the loop's rows, `noise` draws theirs."""

    schedule: DiffusionSchedule
    rows: torch.Tensor
    noise: Noise


def sample_head(
    head: Head,
    z: torch.Tensor,
    schedule: DiffusionSchedule | list[RowGroup],
    noise: Noise | None,
    temperature: float = 1.0,
    cfg_scale: float | torch.Tensor = 1.0,
    z_null: torch.Tensor | None = None,
    clip: float = 0.0,
    guide_head: Head | None = None,
    z_guide: torch.Tensor | None = None,
    guide_scale: torch.Tensor | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Sample (N, C) values given z (N, Dz) through the `schedule`'s steps (a respaced process). With `z_null`
    (N, Dz), the noise prediction is guided: uncond + cfg_scale (cond - uncond), cfg_scale one number or (N,).
    With `guide_head` and its conditions `z_guide` (N, Dz'), autoguidance adds (g - 1) (cond - guide) to the noise
    prediction, g = guide_scale (N,): the weaker model's head denoises the same x_t (Karras et al. 2024's own
    setting, a diffusion model guided by a worse version of itself).

    Both guidances act only at the steps whose noise level t / T lies in `interval` = (low, high) (Kynkäänniemi et
    al. 2024, "Applying guidance in a limited interval"; for EDM2 they found guidance at high noise costs variety
    and at low noise does little, while on the shipped MAR the low-noise end is what cost FD: docs/quality.md);
    outside it a row runs its conditional prediction alone, and a step with no guided row skips the unconditional
    rows' pass.

    `schedule` may instead be groups of rows, each with its own process and noise (`noise` is then None): their
    loops end together, a group of k steps joining at the k-th step from the end, and each step's rows that are
    running share one call of the head, so groups of 100 and 40 steps cost 100 calls, not 140."""
    groups = schedule if isinstance(schedule, list) else [RowGroup(schedule, torch.arange(len(z)), noise)]
    N = len(z)
    if z_null is not None:  # one scale per row; a row at exactly 1 keeps its conditional prediction bit for bit
        cfg_scale = torch.as_tensor(cfg_scale, dtype=torch.float32, device=z.device).expand(N)
    x = None
    for group in groups:  # x_T, (N, C)
        first = group.noise(0).float()
        x = torch.empty(N, first.shape[1], dtype=first.dtype, device=first.device) if x is None else x
        x[group.rows.to(x.device)] = first
    C = x.shape[1]
    steps = max(group.schedule.num_timesteps for group in groups)
    for i in reversed(range(steps)):
        live = [group for group in groups if group.schedule.num_timesteps > i]
        rows = None if len(live) == len(groups) == 1 else torch.cat([g.rows for g in live]).to(x.device)

        def part(tensor, rows=rows):  # the running rows of a per-row tensor
            return tensor if rows is None or tensor is None else tensor[rows]

        x_i, z_i = part(x), part(z)
        # the network knows the original 1000-step timesteps
        net_t = torch.cat([g.schedule.timestep_map[i].expand(len(g.rows)) for g in live]).to(x.device)
        level = torch.cat([g.schedule.noise_level(torch.tensor([i])).expand(len(g.rows)) for g in live])
        inside = ((level >= interval[0]) & (level <= interval[1])).to(x.device)
        if z_null is None:
            out = head(x_i, net_t, z_i).float()
            cond = out[:, :C]
        else:
            scales = torch.where(inside, part(cfg_scale), 1.0)
            guided = (scales != 1.0).nonzero().squeeze(1)  # only these rows need their unconditional pass
            n = len(x_i)
            x_both, t_both = torch.cat([x_i, x_i[guided]]), torch.cat([net_t, net_t[guided]])
            both = head(x_both, t_both, torch.cat([z_i, part(z_null)[guided]])).float()
            out = both[:n].clone()  # the variance stays the conditional rows'
            out[guided, :C] = guide_rows(torch.cat([both[guided, :C], both[n:, :C]]), scales[guided])
            cond = both[:n, :C]
        if guide_head is not None and bool(inside.any()):
            guide = guide_head(x_i, net_t, part(z_guide)).float()[:, :C]
            g_scales = torch.where(inside, part(guide_scale), 1.0)
            out = torch.cat([autoguide_rows(out[:, :C], cond, guide, g_scales), out[:, C:]], dim=1)
        offset = 0
        for group in live:
            own = slice(offset, offset + len(group.rows))
            offset = own.stop
            k = group.schedule.num_timesteps
            t = torch.full((own.stop - own.start,), i, dtype=torch.long, device=x.device)
            mean, log_variance = group.schedule.p_mean_variance(out[own], x_i[own], t, clip)
            # DDPM: no noise is added by the last step (t = 0).
            new = mean + torch.exp(0.5 * log_variance) * group.noise(k - i).float() * temperature if i > 0 else mean
            if rows is None:
                x = new
            else:
                x[group.rows.to(x.device)] = new
    return x


def per_sample_noise(
    generators: list[torch.Generator] | None, owners: torch.Tensor, dim: int, device: torch.device
) -> Noise:
    """Noise for N rows whose sample is `owners` (N,): each sample's rows, in order, from its own generator (None:
    the global RNG), so a sample's values do not depend on the rest of the batch."""
    owners = owners.cpu()

    def draw(index: int) -> torch.Tensor:
        out = torch.empty(len(owners), dim)
        for b in owners.unique().tolist():
            rows = owners == b
            g = generators[b] if generators is not None else None
            out[rows] = torch.randn(
                int(rows.sum()), dim, generator=g, device=g.device if g is not None else "cpu"
            ).cpu()
        return out.to(device)

    return draw


def padding_rows(positions: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: rows a policy added to pad ragged counts (a position already `filled` (B, L), or a repeat of
    the sample's first position); they get no value of their own."""
    n = positions.shape[1]
    repeat = (positions == positions[:, :1]) & (torch.arange(n, device=positions.device) > 0)
    return repeat | filled.gather(1, positions)


def sample_values(
    model,
    rows: StepRows,
    head_steps: list[int],
    temperature: float,
    generators: list[torch.Generator] | None,
    clip: float = 0.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """A continuous order's step for B samples: their prediction's z ((copies B, n, Dz), conditional rows first)
    -> values (B, n, D) sampled by the order's head (`model.head`, `model.head_schedule`) in head_steps[b] steps,
    sample b's noise from generators[b]. rows.scales: (B,) guidance scales, or None without unconditional rows; all
    ones runs the conditional rows alone."""
    B = len(rows)
    positions, z_all = rows.prediction.positions[:B], rows.prediction.z
    D = model.token_dim
    if positions.numel() == 0:  # a step that reveals nothing (more steps than tokens): no head call
        return torch.zeros(B, 0, D, device=z_all.device)
    filled = rows.filled.to(positions.device)
    pad = padding_rows(positions, filled)
    keep = ~pad
    z = z_all[:B][keep]  # (N, Dz) row-major over (sample, position)
    owners = torch.arange(B, device=positions.device)[:, None].expand_as(positions)[keep]
    guided = rows.scales is not None and bool((rows.scales != 1.0).any())
    z_null = z_all[B : 2 * B][keep] if guided else None
    scales = rows.scales.to(z.device)[owners] if guided else 1.0
    groups = []
    row_owners = owners.cpu()  # the groups' bookkeeping stays on the CPU, as the noise's does
    row_steps = torch.tensor(head_steps)[row_owners]
    for k in sorted(set(row_steps.tolist()), reverse=True):  # samples of one step count share a process
        index = (row_steps == k).nonzero().squeeze(1)
        noise = per_sample_noise(generators, row_owners[index], D, z.device)
        groups.append(RowGroup(model.head_schedule.respaced(k), index, noise))
    guide_head = z_guide = guide_scales = None
    if rows.guide is not None and bool((rows.guide_scales != 1.0).any()):
        guide_head, z_guide = rows.guide_model.head, rows.guide.to(z.device)[keep]
        guide_scales = rows.guide_scales.to(z.device)[owners]
    sampled = sample_head(
        model.head,
        z,
        groups,
        None,
        temperature,
        scales,
        z_null,
        clip,
        guide_head,
        z_guide,
        guide_scales,
        interval=interval,
    )
    values = torch.zeros(B, positions.shape[1], D, device=z.device)
    values[keep] = sampled
    # Padding keeps what the samples hold there, or repeats the sample's first row (then the same position).
    held = rows.tokens.to(z.device).gather(1, positions[..., None].expand(-1, -1, D)).to(values.dtype)
    known = filled.gather(1, positions)[..., None]
    return torch.where(pad[..., None], torch.where(known, held, values[:, :1]), values)
