"""KL-regularised autoencoder: pixels <-> continuous latents (the tokenizer of MAR, "Autoregressive Image
Generation without Vector Quantization", Li et al. 2024; the LDM design of Rombach et al. 2022).

The encoder predicts a diagonal Gaussian posterior per latent position (its mean and log-variance); training
samples from it and pays a small KL to N(0, I), so the latent space stays smooth for a generator that models
continuous values. The conv encoder and decoder are argen's shared ones (`tokenizers/convnet.py`, the
taming-transformers design MAR's `models/vae.py` also uses); official checkpoints load through
`argen.convert.mar`, which renames their keys.

The generator sees latents as (z - `latent_shift`) * `scale_factor` (MAR: no shift and 0.2325, about one over the
latents' std; per channel, a shift and a scale each), so the normalisation lives here, on the component that owns it.
`argen tokenize` measures it on the data it encodes (the posterior means' std, or each channel's mean and std) and
`argen train` stores it in the pipeline's tokenizer.

As a generator's tokenizer it speaks tokens: `encode` gives (B, L, D) scaled posterior means, one token per latent
position in raster order (D = embed_dim; MAR's patchify at patch size 1), and `token_mask` the (B, L) positions of
a pixel region, where a VQ tokenizer speaks (B, L) ids: known tokens for editing are built the same way for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_sizes
from argen.pretrained import Pretrained, register
from argen.tokenizers.convnet import Decoder, Encoder


@dataclass
class KLConfig:
    image_size: int = 256
    image_channels: int = 3
    embed_dim: int = 16  # latent channels (MAR's vae_embed_dim)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    # latents the generator sees = (posterior sample - latent_shift) * scale_factor: one number (MAR's vae scale),
    # or one per channel with a per-channel shift (`argen tokenize --normalize channel` measures them)
    scale_factor: float | list[float] = 0.2325
    latent_shift: list[float] | None = None  # None: 0
    kl_weight: float = 1e-6  # weight of the KL term in the training loss

    def __post_init__(self) -> None:
        for name in ("image_size", "image_channels", "embed_dim", "num_res_blocks"):
            check_int(self, name)
        check_int(self, "ch", minimum=32)
        check_sizes(self, "ch_mult")
        self._check_channels()
        check_number(self, "kl_weight", at_least=0.0)
        if self.ch % 32:
            raise ConfigError(f"KLConfig.ch={self.ch}: must be a multiple of 32 (GroupNorm uses 32 groups)")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"KLConfig.image_size={self.image_size} is not a multiple of the downsample factor {self.downsample}"
            )

    def _check_channels(self) -> None:
        scale, shift = self.scale_factor, self.latent_shift
        if isinstance(scale, (list, tuple)):
            if len(scale) != self.embed_dim or not all(isinstance(v, (int, float)) and v > 0 for v in scale):
                raise ConfigError(
                    f"KLConfig.scale_factor: one number > 0, or {self.embed_dim} (one per channel), got {scale!r}"
                )
        else:
            check_number(self, "scale_factor", above=0.0)
        if shift is not None and (
            not isinstance(shift, (list, tuple))
            or len(shift) != self.embed_dim
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in shift)
        ):
            raise ConfigError(f"KLConfig.latent_shift: None or {self.embed_dim} finite numbers, got {shift!r}")

    def channels(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) as (C, 1, 1) tensors on `like`'s device and dtype, for latents (B, C, h, w)."""
        scale = torch.as_tensor(self.scale_factor, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
        shift = torch.as_tensor(self.latent_shift or 0.0, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
        return scale, shift

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) per latent value: (B, D, h, w) mean and log-variance."""

    mean: torch.Tensor
    logvar: torch.Tensor  # clamped to [-30, 20] as the official code does

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """moments (B, 2D, h, w): the mean channels, then the log-variance channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * noise; noise (B, D, h, w) standard normal, drawn by the caller."""
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """(B,) KL(q || N(0, I)) summed over the latent values."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class KLOutput:
    reconstruction: torch.Tensor  # (B, C, H, W), not clamped
    loss: torch.Tensor  # reconstruction + kl_weight * KL per image
    reconstruction_loss: torch.Tensor
    kl: torch.Tensor  # mean over images of the summed KL


@register
class KLTokenizer(nn.Module, Pretrained):
    """Pixels (B, C, H, W) in [-1, 1] <-> scaled latent tokens (B, L, embed_dim) (or latents (B, embed_dim, h, w))."""

    component_type = "kl_tokenizer"
    config_class = KLConfig
    values = "continuous"  # tokens are (B, L, D) vectors, as the orders' OrderSpec.values
    vocab_size = 0  # no codebook

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = c = config
        # MAR's encoder outputs mean and log-variance (double_z); its decoder has attention only in the middle.
        self.encoder = Encoder(c.image_channels, c.ch, c.ch_mult, c.num_res_blocks, 2 * c.embed_dim)
        self.decoder = Decoder(c.embed_dim, c.ch, c.ch_mult, c.num_res_blocks, c.image_channels, attention=False)
        self.quant_conv = nn.Conv2d(2 * c.embed_dim, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.embed_dim, 1)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def seq_len(self) -> int:
        return self.config.grid_size**2

    @property
    def token_dim(self) -> int:
        return self.config.embed_dim

    @staticmethod
    def to_tokens(latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h*w, D): one token per latent position, raster order."""
        return latents.flatten(2).transpose(1, 2)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) -> (B, D, h, w), the inverse of `to_tokens`."""
        g, D = self.grid_size, self.config.embed_dim
        if tokens.dim() != 3 or tokens.shape[1:] != (g * g, D):
            raise ValueError(f"tokens must be (B, {g * g}, {D}), got {tuple(tokens.shape)}")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], D, g, g)

    def token_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool pixel mask (True = keep) -> (B, seq_len) bool: tokens whose area is mostly kept."""
        g = self.grid_size
        return (F.interpolate(keep.float(), size=(g, g), mode="area") >= 0.5).flatten(1)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2 * embed_dim, h, w): the posterior's mean channels, then its log-variance."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.image_channels:
            raise ValueError(f"images must be (B, {c.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % c.downsample or images.shape[-1] % c.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {c.downsample}")
        return self.quant_conv(self.encoder(images))

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.moments(images))

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """(B, C, H, W) -> scaled tokens (B, L, embed_dim), what a generator reads and samples (as a VQ tokenizer's
        encode gives ids): the posterior means, as the latent shards a generator trains on hold them, times
        `scale_factor`; with `sample`, a posterior sample instead (noise from `generator`, else the global RNG)."""
        return self.to_tokens(self.latents(images, generator, sample))

    def latents(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """(B, C, H, W) -> scaled latents (B, embed_dim, h, w): the posterior's mean, or a sample of it with
        `sample` (noise from `generator`)."""
        posterior = self.posterior(images)
        z = posterior.mean
        if sample:
            noise = torch.randn(z.shape, generator=generator, device=generator.device if generator else None)
            z = posterior.sample(noise.to(z.device))
        scale, shift = self.config.channels(z)
        return (z - shift) * scale

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) latents in the posterior's own scale -> (B, C, H, W) images, not clamped."""
        return self.decoder(self.post_quant_conv(z))

    def unscaled_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D) posterior means in the posterior's own scale: what latent shards store
        (deterministic; the scale factor is measured on them and applied when they are read)."""
        return self.to_tokens(self.posterior(images).mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled tokens (B, L, embed_dim), as `encode` gives and the generator samples, or scaled latents
        (B, embed_dim, h, w), as `latents` gives -> images (B, C, H, W), not clamped."""
        if latents.dim() == 3:
            latents = self.from_tokens(latents)
        if latents.dim() != 4 or latents.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must be (B, {self.config.embed_dim}, h, w), got {tuple(latents.shape)}")
        scale, shift = self.config.channels(latents)
        return self.decode_unscaled(latents / scale + shift)

    def decode_partial(self, tokens: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """A preview of partly generated tokens (B, L, D) with their (B, L) filled mask: unknown positions get a
        zero token (the prior's mean; the latents' own mean under a per-channel shift)."""
        return self.decode(tokens * filled[..., None].to(tokens.dtype))

    def forward(self, images: torch.Tensor) -> KLOutput:
        """Training: reconstruct a posterior sample (global RNG); MSE + kl_weight * KL (LDM's KL term, with a
        plain pixel loss in place of the perceptual and adversarial ones, so it runs on a CPU)."""
        posterior = self.posterior(images)
        recon = self.decode_unscaled(posterior.sample(torch.randn_like(posterior.mean)))
        rec_loss = F.mse_loss(recon, images)
        kl = posterior.kl().mean()
        return KLOutput(recon, rec_loss + self.config.kl_weight * kl, rec_loss, kl)


# Presets are data. "mar-kl16" is MAR's released KL-16 (256x256 RGB, 16 latent channels, stride 16).
KL_PRESETS: dict[str, KLConfig] = {
    "mar-kl16": KLConfig(),
    "mnist-kl": KLConfig(image_size=28, image_channels=1, embed_dim=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1),
}
