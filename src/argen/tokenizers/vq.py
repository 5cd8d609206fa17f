"""Single-scale VQ image tokenizer with a cosine (l2-normalised) codebook, as in LlamaGen's VQ-16.

Parameter names match LlamaGen's `VQModel` (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`,
`quantize.embedding.weight`, `quantize.codebook_used`), so its checkpoints load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_sizes
from argen.pretrained import Pretrained, register
from argen.tokenizers.convnet import Decoder, Encoder

# LlamaGen keeps the ids of the last 65,536 quantised vectors in a fixed-length buffer, whatever the
# codebook size; we use it the same way, to measure usage and to find dead codes.
USAGE_WINDOW = 65536


@dataclass
class VQConfig:
    image_size: int = 32
    image_channels: int = 3
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256

    def __post_init__(self) -> None:
        for name in ("image_size", "image_channels", "codebook_embed_dim", "num_res_blocks", "z_channels"):
            check_int(self, name)
        check_int(self, "codebook_size", minimum=2)
        check_int(self, "ch", minimum=32)
        check_number(self, "commit_loss_beta", at_least=0)
        check_sizes(self, "encoder_ch_mult")
        check_sizes(self, "decoder_ch_mult")
        if len(self.decoder_ch_mult) != len(self.encoder_ch_mult):
            raise ConfigError(
                f"VQConfig: decoder_ch_mult {self.decoder_ch_mult} must have as many levels as encoder_ch_mult "
                f"{self.encoder_ch_mult} (the decoder undoes the encoder's downsampling)"
            )
        if self.ch % 32:
            raise ConfigError(f"VQConfig.ch={self.ch}: must be a multiple of 32 (GroupNorm uses 32 groups)")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"VQConfig.image_size={self.image_size} is not a multiple of the downsample factor {self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w), straight-through in training
    ids: torch.Tensor  # (B, h*w) raster order
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, C, H, W), not clamped
    ids: torch.Tensor  # (B, h*w)
    loss: torch.Tensor  # reconstruction + codebook + beta * commitment
    reconstruction_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))
        # How many ids `codebook_used` holds so far (not saved: the official layout has no such key).
        self.recorded = 0

    def codebook(self) -> torch.Tensor:
        """(V, D) the rows actually used for lookup (normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        flat = z.reshape(-1, D)
        # Squared distance, expanded: |z|^2 + |e|^2 - 2 z.e
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * flat @ codebook.t()
        ids = dist.argmin(dim=1)
        zq = codebook[ids].view(B, h, w, D)
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = F.mse_loss(zq.detach(), z)
        zq = z + (zq - z).detach()  # straight-through estimator
        if self.training:
            self._record(ids.detach())
        return QuantizerOutput(zq.permute(0, 3, 1, 2), ids.view(B, h * w), codebook_loss, commit_loss)

    def _record(self, ids: torch.Tensor) -> None:
        n = min(ids.numel(), USAGE_WINDOW)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids[-n:].to(self.codebook_used.dtype)]))
        self.recorded = min(self.recorded + n, USAGE_WINDOW)

    def usage(self) -> torch.Tensor:
        """(V,) counts of each code among the recently recorded ids."""
        recent = self.codebook_used[USAGE_WINDOW - self.recorded :].long()
        return torch.bincount(recent, minlength=self.embedding.num_embeddings)

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes unused in the recent window onto randomly chosen latent vectors of this batch.

        latents: (B, D, h, w) encoder outputs (before normalisation). Returns the number of codes restarted.
        """
        if latents.dim() != 4:
            raise ValueError(f"restart_dead_codes takes the latent map (B, D, h, w), got shape {tuple(latents.shape)}")
        if self.recorded < min(USAGE_WINDOW, 4 * self.embedding.num_embeddings):
            return 0  # not enough history to call a code dead
        dead = (self.usage() == 0).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        latents = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(0, latents.shape[0], (dead.numel(),), generator=generator, device=latents.device)
        new = latents[pick]
        self.embedding.weight.data[dead] = F.normalize(new, dim=-1) if self.l2_norm else new
        # Forget the window so that restarted codes get a fair chance before the next check.
        self.recorded = 0
        return int(dead.numel())


@register
class VQTokenizer(nn.Module, Pretrained):
    """Pixels (B, C, H, W) in [-1, 1] <-> token ids (B, h*w) in raster order."""

    component_type = "vq_tokenizer"
    config_class = VQConfig
    values = "discrete"  # tokens are codebook ids, as the orders' OrderSpec.values

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.image_channels, c.ch, c.encoder_ch_mult, c.num_res_blocks, c.z_channels)
        self.decoder = Decoder(c.z_channels, c.ch, c.decoder_ch_mult, c.num_res_blocks, c.image_channels)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def seq_len(self) -> int:
        return self.config.grid_size**2

    def token_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool pixel mask (True = keep) -> (B, seq_len) bool: tokens whose area is mostly kept."""
        g = self.grid_size
        return (F.interpolate(keep.float(), size=(g, g), mode="area") >= 0.5).flatten(1)

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, h, w) continuous latent before quantisation."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, h*w) int64 ids."""
        return self.quantize(self.latent(images)).ids

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h*w) ids -> (B, C, H, W) images, not clamped."""
        if ids.dim() != 2 or ids.shape[1] != self.grid_size**2:
            raise ValueError(f"ids must be (B, {self.grid_size**2}), got {tuple(ids.shape)}")
        B, g = ids.shape[0], self.grid_size
        zq = self.quantize.codebook()[ids].view(B, g, g, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decode_latent(zq)

    def decode_partial(self, ids: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """A preview of a partly generated sequence (B, h*w) with its filled mask: positions not chosen yet get a
        zero latent (no code), so the canvas shows what is known where it is known."""
        B, g = ids.shape[0], self.grid_size
        codes = self.quantize.codebook()[torch.where(filled, ids, 0)] * filled[..., None]
        return self.decode_latent(codes.view(B, g, g, -1).permute(0, 3, 1, 2))

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        q = self.quantize(self.latent(images))
        recon = self.decode_latent(q.quantized)
        rec_loss = F.mse_loss(recon, images)
        loss = rec_loss + q.codebook_loss + self.config.commit_loss_beta * q.commit_loss
        return TokenizerOutput(recon, q.ids, loss, rec_loss, q.codebook_loss, q.commit_loss)

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.image_channels:
            raise ValueError(f"images must be (B, {c.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % c.downsample or images.shape[-1] % c.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {c.downsample}")


# Presets are data. "mnist-small" is the shipped default; "llamagen-vq16" is the released VQ-16 (256x256 RGB).
VQ_PRESETS: dict[str, VQConfig] = {
    "mnist-small": VQConfig(
        image_size=28,
        image_channels=1,
        codebook_size=512,
        codebook_embed_dim=8,
        ch=32,
        encoder_ch_mult=(1, 1, 2),
        decoder_ch_mult=(1, 1, 2),
        num_res_blocks=1,
        z_channels=32,
    ),
    "llamagen-vq16": VQConfig(image_size=256, image_channels=3),
}
