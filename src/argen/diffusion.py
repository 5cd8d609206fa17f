"""The Gaussian diffusion process of a diffusion head (MAR §3.3; IDDPM, Nichol & Dhariwal 2021): the noise
schedule, its respacing to fewer sampling steps, q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) and the
model's p(x_{t-1} | x_t) under a learned-range variance.

Shared by the head's training loss (`models/diffusion_head.py`) and its sampling loop (`sampling/diffusion.py`),
so both read one set of tables. The tables are computed in float64 and each looked-up value is rounded to
float32, as MAR's (IDDPM's) numpy tables are; the network predicts eps (MAR's choice) or v, and a value in [-1, 1]
interpolating the log-variance between the posterior's and beta_t (LEARNED_RANGE).

The prediction target belongs to the process, so the loss and the sampler read it from one place: with
x_t = a x_0 + s eps (a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar)), `eps` asks the network for the noise and
recovers x_0 = (x_t - s eps) / a, which multiplies the network's error by s / a (~300 at t = 999 of the cosine
schedule); `v` (Salimans & Ho 2022) asks for v = a eps - s x_0 and recovers x_0 = a x_t - s v, whose error is never
amplified. Both are affine in x_t with the same coefficients for every row, so guidance that mixes two
predictions linearly means the same thing under either.
"""

from __future__ import annotations

import math

import torch


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """IDDPM's cosine schedule (their eq. 17, s = 0.008): (T,) float64 betas."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def spaced_timesteps(num_timesteps: int, count: int) -> list[int]:
    """IDDPM's respacing with one section: `count` timesteps of 0..T-1, evenly strided, rounded."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"the head's sampling steps must be in 1..{num_timesteps}, got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


PREDICTIONS = ("eps", "v")


class DiffusionSchedule:
    """The tables of one discrete diffusion process; `timestep_map[i]` is the original timestep a (respaced)
    index i stands for, which is what the network is told."""

    def __init__(
        self,
        betas: torch.Tensor,
        timestep_map: list[int] | None = None,
        prediction: str = "eps",
        full_timesteps: int | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"the head's prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.betas = b = betas.to(torch.float64)
        self.num_timesteps = len(b)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(b)))
        self.full_timesteps = full_timesteps or len(b)  # T of the process this one was respaced from
        alphas = 1.0 - b
        self.alphas_cumprod = ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = pv = b * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: its log is clipped to the next one's (a one-step process has none:
        # beta's, the largest variance, which only enters a step that adds no noise).
        self.posterior_log_variance_clipped = (torch.cat([pv[1:2], pv[1:]]) if len(b) > 1 else b).log()
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = b.log()

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, prediction: str = "eps") -> DiffusionSchedule:
        """The training process MAR uses: cosine, T = 1000 (its `create_diffusion("", "cosine")`)."""
        return cls.respaced_from(cosine_betas(num_timesteps), num_timesteps, prediction)

    @classmethod
    def respaced_from(cls, betas: torch.Tensor, count: int, prediction: str = "eps") -> DiffusionSchedule:
        """The process keeping `count` of the timesteps of `betas`, with betas recomputed so that the kept
        steps have the original alpha-bar (IDDPM's SpacedDiffusion)."""
        kept = spaced_timesteps(len(betas), count)
        ac = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        new_betas, last = [], 1.0
        for i in kept:
            new_betas.append(1 - ac[i] / last)
            last = ac[i]
        return cls(torch.stack(new_betas), kept, prediction, len(betas))

    def respaced(self, count: int) -> DiffusionSchedule:
        """This process (a full one) sampled in `count` steps, with the same prediction target."""
        return DiffusionSchedule.respaced_from(self.betas, count, self.prediction)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) respaced indices -> (N,) float32 t / T in [0, 1) of the full process (0: clean, near 1: noise)."""
        return self.timestep_map.to(t.device)[t].float() / self.full_timesteps

    @staticmethod
    def take(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, 1) float32 values of a float64 table, on t's device."""
        return table.to(t.device)[t].float()[:, None]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) given the noise: (N, C) rows, (N,) timesteps."""
        return (
            self.take(self.sqrt_alphas_cumprod, t) * x_start + self.take(self.sqrt_one_minus_alphas_cumprod, t) * noise
        )

    def target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for x_t = q_sample(x_start, t, noise): (N, C)."""
        if self.prediction == "eps":
            return noise
        a, s = self.take(self.sqrt_alphas_cumprod, t), self.take(self.sqrt_one_minus_alphas_cumprod, t)
        return a * noise - s * x_start

    def predict_xstart(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x_0 that the network's (N, C) prediction at x_t stands for."""
        if self.prediction == "eps":
            return (
                self.take(self.sqrt_recip_alphas_cumprod, t) * x_t
                - self.take(self.sqrt_recipm1_alphas_cumprod, t) * prediction
            )
        a, s = self.take(self.sqrt_alphas_cumprod, t), self.take(self.sqrt_one_minus_alphas_cumprod, t)
        return a * x_t - s * prediction

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.take(self.posterior_mean_coef1, t) * x_start + self.take(self.posterior_mean_coef2, t) * x_t
        return mean, self.take(self.posterior_log_variance_clipped, t) + torch.zeros_like(x_t)

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip: float = 0.0):
        """The network's (N, 2C) output (eps or v, variance value in [-1, 1]) at x_t -> the mean and log-variance of
        p(x_{t-1} | x_t). clip > 0 clamps the x_0 prediction to [-clip, clip] (0: unclipped, as MAR: latents are
        unbounded)."""
        prediction, var_values = model_output.split(x.shape[1], dim=1)
        min_log = self.take(self.posterior_log_variance_clipped, t)
        max_log = self.take(self.log_betas, t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart(prediction, x, t)
        if clip > 0:
            pred_xstart = pred_xstart.clamp(-clip, clip)
        mean, _ = self.q_posterior(pred_xstart, x, t)
        return mean, log_variance
