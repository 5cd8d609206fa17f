"""MAR's diffusion head ("Autoregressive Image Generation without Vector Quantization", Li et al. 2024, §3.2-3.3):
a small MLP with AdaLN that denoises one token's continuous value x_t given the transformer's output z, and the
diffusion loss that trains it.

Parameter names follow MAR's `models/diffloss.py` (`DiffLoss.net` = `SimpleMLPAdaLN`: `time_embed.mlp`,
`cond_embed`, `input_proj`, `res_blocks.N.{in_ln, mlp, adaLN_modulation}`, `final_layer`), so official
checkpoints load by name. Sampling is not here: `argen.sampling.diffusion` runs the head as a callable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from argen.diffusion import DiffusionSchedule
from argen.models.layers import Linear


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep (GLIDE/DiT: cos then sin, max period 10^4) -> an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) timesteps -> (N, dim) features."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x))), with shift, scale and gate from the condition (DiT's adaLN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(Linear(channels, channels), nn.SiLU(), Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """(x_t (N, C), t (N,), z (N, Dz)) -> (N, 2C): the predicted noise, then the variance interpolation values."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = Linear(z_channels, model_channels)
        self.input_proj = Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier-uniform linears, N(0, 0.02) timestep MLP, zeroed adaLN and output layers (the head
        starts by predicting zero noise and the middle of the variance range)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*self.res_blocks, self.final_layer]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)  # (N, 2C)


@dataclass
class DiffusionLossRows:
    """Per-row terms of the diffusion loss, (N,) each: the MSE of the prediction (eps or v) and the variational bound
    term in bits."""

    mse: torch.Tensor
    vb: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.mse + self.vb


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) in nats of a Gaussian discretised to 256 bins over [-1, 1] (IDDPM's decoder term at t = 0, which
    MAR keeps for its continuous latents)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffLoss(nn.Module):
    """MAR's diffusion loss (its eq. 2): for a token value x_0 (N, C) and the transformer's z (N, Dz), noise it to
    a random timestep and predict the noise (or v, `prediction="v"`); the learned variance is trained by IDDPM's
    variational bound with the mean's prediction detached (their L_hybrid with lambda = 1, MAR's
    `create_diffusion` defaults)."""

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_timesteps: int = 1000,
        prediction: str = "eps",
    ):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        # tables, not parameters: nothing saved
        self.schedule = DiffusionSchedule.cosine(num_timesteps, prediction)

    def loss_rows(
        self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> DiffusionLossRows:
        """target (N, C), z (N, Dz), timesteps t (N,) and noise (N, C) drawn by the caller -> per-row terms."""
        s = self.schedule
        x_t = s.q_sample(target, t, noise)
        dtype = self.net.input_proj.weight.dtype  # the process in float32, the network in its own dtype
        out = self.net(x_t.to(dtype), s.timestep_map.to(t.device)[t], z.to(dtype)).float()  # (N, 2C)
        prediction = out[:, : self.in_channels]
        mse = (s.target(target, t, noise) - prediction).pow(2).mean(dim=1)
        # The bound trains the variance only: the mean comes from the detached prediction.
        frozen = torch.cat([prediction.detach(), out[:, self.in_channels :]], dim=1)
        true_mean, true_log_variance = s.q_posterior(target, x_t, t)
        mean, log_variance = s.p_mean_variance(frozen, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * log_variance).mean(dim=1) / math.log(2.0)
        return DiffusionLossRows(mse, torch.where(t == 0, nll, kl))

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss over rows (weighted by `mask` (N,) when given); t and noise from the global RNG."""
        t = torch.randint(0, self.schedule.num_timesteps, (target.shape[0],), device=target.device)
        rows = self.loss_rows(target.float(), z, t, torch.randn_like(target, dtype=torch.float32)).loss
        if mask is None:
            return rows.mean()
        return (rows * mask).sum() / mask.sum()
