"""Multi-scale residual VQ tokenizer (VAR, Tian et al. 2024, §3.2 and Algorithms 1-2).

An image's latent f (B, C, h, w) becomes K token maps r_1..r_K of growing sizes pn_k x pn_k, coarse to fine.
Each scale quantises the *residual* left by the coarser ones: shrink it to pn x pn (area), pick the nearest code
(raw squared Euclidean distance), enlarge the code map back to h x w (bicubic), refine it with a 3x3 convolution
phi_k(z) = (1 - r) z + r conv(z), add it to f_hat and subtract it from the residual. One codebook serves all
scales. Tokens are laid out scale by scale, each map row-major: L = sum(pn^2).

The conv encoder/decoder are the same as the single-scale tokenizer's; official VAR checkpoints name them
differently and load through `argen.convert.var`. Quantiser names match VAR (`quantize.embedding`,
`quantize.quant_resi.qresi_ls.k`, `quantize.ema_vocab_hit_SV`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_sizes
from argen.pretrained import Pretrained, register
from argen.tokenizers.convnet import Decoder, Encoder
from argen.tokenizers.vq import TokenizerOutput


@dataclass
class MultiScaleVQConfig:
    image_size: int = 256
    image_channels: int = 3
    codebook_size: int = 4096
    z_channels: int = 32  # = codebook vector size (VAR's Cvae)
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # pn of each token map; the last = latent side
    quant_resi: float = 0.5  # r in phi(z) = (1 - r) z + r conv(z)
    share_quant_resi: int = 4  # number of phi convolutions shared across the scales
    quant_conv_kernel: int = 3
    beta: float = 0.25  # commitment weight
    # Training only: the share of images reconstructed from their first k token maps alone (k uniform in 1..K-1),
    # so that the coarse maps must carry each image's layout. At 0 (VAR) a last map as large as the latent can
    # carry everything: on MNIST after 500 steps the coarse maps had a perplexity of 1-3.4 each. The training
    # reconstruction loss then includes the truncated images: compare it only between runs at the same setting.
    prefix_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "image_channels", "z_channels", "num_res_blocks", "quant_conv_kernel"):
            check_int(self, name)
        check_int(self, "codebook_size", minimum=2)
        check_int(self, "ch", minimum=32)
        if self.ch % 32:
            raise ConfigError(f"MultiScaleVQConfig.ch={self.ch}: must be a multiple of 32 (GroupNorm uses 32 groups)")
        check_sizes(self, "ch_mult")
        check_sizes(self, "scales")
        check_number(self, "quant_resi", at_least=0, at_most=1)
        check_number(self, "beta", at_least=0)
        check_number(self, "prefix_dropout", at_least=0, at_most=1)
        if self.prefix_dropout > 0 and len(self.scales) < 2:
            raise ConfigError(f"MultiScaleVQConfig.prefix_dropout needs 2 scales or more, got scales {self.scales}")
        side = self.image_size // 2 ** (len(self.ch_mult) - 1)
        if self.scales[-1] != side:
            raise ConfigError(
                f"the last scale must equal the latent side {side} (image_size {self.image_size} / "
                f"{2 ** (len(self.ch_mult) - 1)}), got scales {self.scales}"
            )
        if list(self.scales) != sorted(set(self.scales)):
            raise ConfigError(f"MultiScaleVQConfig.scales must grow strictly, got {self.scales}")
        check_int(self, "share_quant_resi")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.scales)


class Phi(nn.Conv2d):
    """phi(z) = (1 - r) z + r conv3x3(z): the refinement that makes upsampled code maps less blocky."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * (1 - self.ratio) + super().forward(z) * self.ratio


class SharedPhi(nn.Module):
    """`share` convolutions spread over progress [0, 1]; scale k of K uses the one whose tick is nearest k/(K-1)."""

    def __init__(self, channels: int, ratio: float, share: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(share))
        self.ticks = np.linspace(1 / (3 * share), 1 - 1 / (3 * share), share)

    def index(self, scale: int, num_scales: int) -> int:
        # float64 numpy, as the official code, so that exact ties (10 scales: scales 2 and 7) break the same way
        return int(np.argmin(np.abs(self.ticks - scale / max(num_scales - 1, 1))))

    def forward(self, z: torch.Tensor, scale: int, num_scales: int) -> torch.Tensor:
        return self.qresi_ls[self.index(scale, num_scales)](z)


@dataclass
class MultiScaleQuantizerOutput:
    f_hat: torch.Tensor  # (B, C, h, w), straight-through in training
    ids: list[torch.Tensor]  # per scale (B, pn*pn)
    loss: torch.Tensor  # codebook + beta * commitment, averaged over scales


class MultiScaleQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, scales: tuple[int, ...], ratio: float, share: int, beta: float):
        super().__init__()
        self.scales = tuple(scales)
        self.beta = beta
        self.recorded = 0  # training batches seen since the last restart (not saved: not in the official layout)
        self.embedding = nn.Embedding(codebook_size, dim)
        # Codes at the scale of typical latents (a tiny init leaves the codebook behind the encoder).
        nn.init.normal_(self.embedding.weight, std=0.3)
        self.quant_resi = SharedPhi(dim, ratio, share)
        # Per-scale code usage (EMA of hit counts), kept as in the official layout; used for dead-code restarts.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(scales), codebook_size))

    def phi(self, z: torch.Tensor, scale: int) -> torch.Tensor:
        return self.quant_resi(z, scale, len(self.scales))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, p, p) -> (B, p*p) ids of the nearest codes (squared Euclidean, raw codebook)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * flat @ codebook.t()
        return dist.argmin(dim=1).view(z.shape[0], -1)

    def code_map(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, pn*pn) ids -> (B, C, pn, pn) code vectors."""
        pn = int(round(ids.shape[1] ** 0.5))
        return self.embedding(ids).view(ids.shape[0], pn, pn, -1).permute(0, 3, 1, 2)

    def residual_step(self, code_map: torch.Tensor, scale: int, side: int) -> torch.Tensor:
        """Enlarge a scale's code map to the latent size (bicubic, not at the last scale) and refine it with phi."""
        if scale != len(self.scales) - 1:
            code_map = F.interpolate(code_map, size=(side, side), mode="bicubic")
        return self.phi(code_map, scale)

    def _residual_quantise(self, f: torch.Tensor):
        """VAR's Algorithm 1, one scale at a time: yields (scale, the residual it rounds at pn x pn, its ids, its
        contribution h to f_hat)."""
        side = f.shape[-1]
        f_rest = f.detach().clone()
        last = len(self.scales) - 1
        for si, pn in enumerate(self.scales):
            rest = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx = self.nearest(rest)
            h = self.residual_step(self.code_map(idx), si, side)
            f_rest = f_rest - h.detach()
            yield si, rest, idx, h

    def forward(self, f: torch.Tensor, kept_scales: torch.Tensor | None = None) -> MultiScaleQuantizerOutput:
        """kept_scales (B,) (training): an image with k < K keeps only its first k maps' f_hat, without the
        straight-through estimator, so the reconstruction loss trains the coarse codes and phi directly."""
        B = f.shape[0]
        f_hat, prefix = torch.zeros_like(f), torch.zeros_like(f)
        ids, loss = [], f.new_zeros(())
        for si, _, idx, h in self._residual_quantise(f):
            ids.append(idx)
            f_hat = f_hat + h
            if kept_scales is not None:
                prefix = prefix + h * (si < kept_scales).view(B, 1, 1, 1)
            # VAR: commitment pulls the encoder to f_hat, the codebook (and phi) to f
            loss = loss + F.mse_loss(f_hat, f.detach()) + self.beta * F.mse_loss(f_hat.detach(), f)
            if self.training:
                with torch.no_grad():
                    hits = torch.bincount(idx.flatten(), minlength=self.embedding.num_embeddings).float()
                    self.ema_vocab_hit_SV[si].mul_(0.99).add_(hits, alpha=0.01)
        if self.training:
            self.recorded += 1
            f_hat = f + (f_hat - f).detach()  # straight-through to the encoder
        if kept_scales is not None:
            f_hat = torch.where((kept_scales < len(self.scales)).view(B, 1, 1, 1), prefix, f_hat)
        return MultiScaleQuantizerOutput(f_hat, ids, loss / len(self.scales))

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Codes (almost) never hit at any scale recently move onto residuals that this batch's latents
        (B, C, h, w) leave to be rounded, the scale drawn uniformly for each code: restarting onto full-size latent
        vectors alone served the last scale only, and each coarse map had kept 1-3 codes. A scale's residuals are
        drawn without replacement (the 1x1 map has only B): codes on one vector would tie in `nearest`, and the
        higher one never win. What a coarse scale cannot give goes on to the next. Returns the number of codes
        restarted."""
        if latents.dim() != 4:
            raise ValueError(f"restart_dead_codes takes the latent map (B, C, h, w), got shape {tuple(latents.shape)}")
        if self.recorded < 100:  # the usage EMA (decay 0.99) needs ~100 batches to mean anything
            return 0
        dead = (self.ema_vocab_hit_SV.sum(0) < 1e-3).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pools = [rest.permute(0, 2, 3, 1).flatten(0, 2) for _, rest, _, _ in self._residual_quantise(latents)]
        device = latents.device
        drawn = torch.randint(0, len(pools), (dead.numel(),), generator=generator, device=device)
        wanted = torch.bincount(drawn, minlength=len(pools)).tolist()
        vectors, spill = [], 0
        for si, pool in enumerate(pools):
            n = wanted[si] + spill
            take = n if si == len(pools) - 1 else min(n, len(pool))
            spill = n - take
            order = torch.randperm(len(pool), generator=generator, device=device)
            # the last scale repeats itself only if the codes outnumber its residuals
            picks = order[torch.arange(take, device=device) % len(pool)]
            vectors.append(pool[picks])
        self.embedding.weight.data[dead] = torch.cat(vectors)
        self.ema_vocab_hit_SV[:, dead] = 1.0 / len(self.scales)  # a grace period before they can die again
        self.recorded = 0
        return int(dead.numel())

    def ids_to_fhat(self, ids: list[torch.Tensor], side: int, upto: int | None = None) -> torch.Tensor:
        """Accumulated f_hat (B, C, side, side) from the token maps of scales 0..upto (all by default)."""
        f_hat = None
        for si, idx in enumerate(ids[: None if upto is None else upto + 1]):
            h = self.residual_step(self.code_map(idx), si, side)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def next_scale_inputs(self, ids: list[torch.Tensor], side: int) -> torch.Tensor:
        """Teacher-forcing inputs of scales 1..K-1: the accumulated f_hat of the coarser scales shrunk (area) to
        each next size, flattened row-major. -> (B, L - scales[0]**2, C)."""
        B = ids[0].shape[0]
        f_hat, inputs = 0, []
        for si in range(len(self.scales) - 1):
            f_hat = f_hat + self.residual_step(self.code_map(ids[si]), si, side)
            pn = self.scales[si + 1]
            inputs.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, f_hat.shape[1], -1).transpose(1, 2))
        return torch.cat(inputs, dim=1)


@register
class MultiScaleVQ(nn.Module, Pretrained):
    """Pixels (B, C, H, W) in [-1, 1] <-> token ids (B, L) laid out scale by scale."""

    component_type = "multiscale_vq_tokenizer"
    config_class = MultiScaleVQConfig
    values = "discrete"  # tokens are codebook ids, as the orders' OrderSpec.values

    def __init__(self, config: MultiScaleVQConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.image_channels, c.ch, c.ch_mult, c.num_res_blocks, c.z_channels)
        self.decoder = Decoder(c.z_channels, c.ch, c.ch_mult, c.num_res_blocks, c.image_channels)
        k = c.quant_conv_kernel
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, k, padding=k // 2)
        self.quantize = MultiScaleQuantizer(
            c.codebook_size, c.z_channels, c.scales, c.quant_resi, c.share_quant_resi, c.beta
        )

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    @property
    def side(self) -> int:
        return self.config.scales[-1]

    def token_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool pixel mask (True = keep) -> (B, L) bool: per scale, tokens whose area is mostly kept."""
        maps = [F.interpolate(keep.float(), size=(pn, pn), mode="area").flatten(1) for pn in self.scales]
        return torch.cat(maps, dim=1) >= 0.5

    def decode_prefix(self, ids: torch.Tensor, num_scales: int) -> torch.Tensor:
        """The image the first `num_scales` token maps alone give (progressive previews). ids: (B, L)."""
        return self.decode_latent(self.quantize.ids_to_fhat(self.split(ids), self.side, upto=num_scales - 1))

    def decode_partial(self, ids: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """A preview of a partly generated sequence (B, L) with its filled mask (B, L): the image of the leading
        token maps that are complete (coarse to fine), as a next-scale order fills them."""
        complete, begin = 0, 0
        for pn in self.scales:
            if not bool(filled[:, begin : begin + pn * pn].all()):
                break
            complete, begin = complete + 1, begin + pn * pn
        if complete == 0:
            return ids.new_zeros(len(ids), self.config.image_channels, self.side, self.side).float().sub(1)
        return self.decode_prefix(torch.where(filled, ids, 0), complete)

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.image_channels or images.shape[-1] != c.image_size:
            raise ValueError(
                f"images must be (B, {c.image_channels}, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
            )
        return self.quant_conv(self.encoder(images))

    def split(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> per-scale (B, pn*pn)."""
        if ids.dim() != 2 or ids.shape[1] != self.seq_len:
            raise ValueError(f"ids must be (B, {self.seq_len}), got {tuple(ids.shape)}")
        return list(ids.split([pn * pn for pn in self.scales], dim=1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L) ids, scale by scale."""
        return torch.cat(self.quantize(self.latent(images)).ids, dim=1)

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, C, H, W) images in [-1, 1] (clamped, as VAR does)."""
        return self.decode_latent(self.quantize.ids_to_fhat(self.split(ids), self.side))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        f = self.latent(images)
        kept = None
        if self.training and self.config.prefix_dropout > 0:
            K = len(self.scales)  # >= 2: the config checks
            kept = torch.randint(1, K, (len(images),), device=images.device)
            kept = torch.where(torch.rand(len(images), device=images.device) < self.config.prefix_dropout, kept, K)
        q = self.quantize(f, kept)
        recon = self.decoder(self.post_quant_conv(q.f_hat))
        rec_loss = F.mse_loss(recon, images)
        zero = rec_loss.new_zeros(())
        return TokenizerOutput(recon, torch.cat(q.ids, 1), rec_loss + q.loss, rec_loss, q.loss, zero)


# Presets are data. "mnist-multiscale" feeds the shipped next-scale model: 28x28 digits, 7x7 latent, 7 scales (L=140),
# trained on prefixes too so that its coarse maps carry codes (docs/quality.md).
MULTISCALE_PRESETS: dict[str, MultiScaleVQConfig] = {
    "mnist-multiscale": MultiScaleVQConfig(
        image_size=28,
        image_channels=1,
        codebook_size=512,
        z_channels=16,
        ch=32,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        scales=(1, 2, 3, 4, 5, 6, 7),
        prefix_dropout=0.25,
    ),
    "var-vae-256": MultiScaleVQConfig(),
}
