"""MAR: masked autoregressive generation over continuous tokens ("Autoregressive Image Generation without Vector
Quantization", Li et al. 2024).

Tokens are continuous latents of a KL tokenizer (B, L, D), not codebook ids. A bidirectional encoder-decoder
(MAE-style, §3.4) reads the known tokens and predicts, at every position, a vector z; a small diffusion head
(`models/diffusion_head.py`) models p(x | z) for each unknown token, trained with the diffusion loss (§3.2).
Generation reveals tokens in a random order, several per step on a cosine schedule (§3.4); which ones, and the
head's sampling loop with its noise, are the sampler's business (`argen.sampling.mar`, `argen.sampling.diffusion`).

Parameter names and math follow MAR's `models/mar.py` and timm's ViT `Block`, so official checkpoints load by
name (`argen.convert.mar`). Quirks kept from the official code:
- the encoder input is prefixed by `buffer_size` buffer tokens that all carry the class embedding;
- "no condition" (guidance's unconditional rows, label dropout) is the learned `fake_latent`, not a class row;
- the encoder sees only the known tokens (masked ones are dropped, not replaced), the decoder pads them back
  with `mask_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from argen.diffusion import PREDICTIONS
from argen.errors import ConfigError, check_int, check_number, check_probability
from argen.models.diffusion_head import DiffLoss
from argen.models.interface import Condition, DecodeState, LossOutput, OrderSpec, Prediction, as_condition
from argen.models.layers import Linear, attention
from argen.pretrained import Pretrained, register

# DiSA ("Diffusion Step Annealing in Autoregressive Image Generation", Zhao et al. 2025, §4): how the head's steps
# move from `head_steps` at the first AR step to `head_steps_last` at the last, as a function of the step's progress
# u = k / (K - 1) in [0, 1]; the weight given to `head_steps`.
HEAD_ANNEALING = {
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
    "two-stage": lambda u: 1.0 if u < 0.5 else 0.0,
}


@dataclass(frozen=True)
class MAROptions:
    """Sampler options of the MAR order (MAR §3.4): how many transformer steps, how many head steps.

    DiSA (diffusion step annealing): later tokens follow narrower distributions given the ones already known, so
    the head needs fewer steps for them. With `head_steps_last` > 0 the head's steps go from `head_steps` at the
    first AR step to `head_steps_last` at the last along `head_annealing`; 0 keeps `head_steps` throughout (plain
    MAR). Training-free: the head is respaced per step from the same 1000-step process.
    """

    steps: int = 64  # autoregressive steps (MAR's num_iter); tokens per step follow a cosine schedule
    head_steps: int = 100  # the diffusion head's sampling steps, respaced from its 1000 (num_sampling_steps)
    head_steps_last: int = 0  # DiSA: the head's steps at the last AR step (0: no annealing)
    head_annealing: str = "linear"  # DiSA: a key of HEAD_ANNEALING
    # Clamp the head's x0 prediction to ±head_clip at every step (latents are normalised to unit std); 0 = off, as
    # MAR. Near t = 1000 the cosine schedule multiplies the eps error by up to ~300 in x0, and a first respaced step
    # carries a fraction of it into x_t: a small head's values then diverge (docs/quality.md, MAR).
    head_clip: float = 0.0
    # Guidance interval (Kynkäänniemi et al. 2024): the head's steps are guided only where their noise level t / T
    # lies in [head_cfg_low, head_cfg_high] (0: clean, 1: pure noise); elsewhere they run the conditional head alone,
    # at half the cost. 0 and 1 guide every step, as MAR.
    head_cfg_low: float = 0.0
    head_cfg_high: float = 1.0

    def __post_init__(self) -> None:
        check_int(self, "steps")
        check_number(self, "head_clip", at_least=0.0)
        check_number(self, "head_cfg_low", at_least=0.0, at_most=1.0)
        check_number(self, "head_cfg_high", at_least=0.0, at_most=1.0)
        if self.head_cfg_low > self.head_cfg_high:
            raise ConfigError(
                f"head_cfg_low ({self.head_cfg_low}) must not exceed head_cfg_high ({self.head_cfg_high})"
            )
        check_int(self, "head_steps")
        check_int(self, "head_steps_last", minimum=0)
        if self.head_annealing not in HEAD_ANNEALING:
            raise ConfigError(f"head_annealing {self.head_annealing!r} unknown; choose from {sorted(HEAD_ANNEALING)}")

    @property
    def head_cfg_interval(self) -> tuple[float, float]:
        return (self.head_cfg_low, self.head_cfg_high)

    def head_steps_at(self, step: int, num_steps: int) -> int:
        """The head's sampling steps at AR step `step` of `num_steps`: `head_steps`, or DiSA's annealed count
        (rounded, at least 1)."""
        if not self.head_steps_last or num_steps < 2:
            return self.head_steps
        weight = HEAD_ANNEALING[self.head_annealing](step / (num_steps - 1))
        return max(1, round(self.head_steps_last + weight * (self.head_steps - self.head_steps_last)))

    def masked_after(self, step: int, num_steps: int, masked_at_start: torch.Tensor) -> torch.Tensor:
        """(B,) tokens still masked after `step`: floor(n cos(pi/2 (step + 1) / T)) of the n masked at the start
        (MaskGIT's cosine schedule, which MAR follows)."""
        ratio = math.cos(math.pi / 2.0 * (step + 1) / num_steps)
        return (masked_at_start * ratio).floor().long()

    def still_masked(
        self, step: int, num_steps: int, now: torch.Tensor, masked_at_start: torch.Tensor
    ) -> torch.Tensor:
        """(B,) masked after `step` given (B,) `now` masked before it, as MAR counts it: the schedule's count, but at
        least one fewer than now and at least 1 (the last step, which reveals the rest, aside)."""
        return torch.minimum(self.masked_after(step, num_steps, masked_at_start), now - 1).clamp(min=1)

    def head_passes(self, tokens: int) -> int:
        """The head's calls (its steps, summed over the AR steps) to fill `tokens` masked tokens. Each step reveals
        at least one token while two or more are masked; with more steps than tokens the ones revealing none skip the
        head, and the walk jumps over them to the last step (so a huge `steps` costs nothing to count)."""
        start = torch.tensor([tokens])
        now, calls = start, 0
        for step in range(self.steps - 1):
            if int(now) <= 1:
                break
            calls += self.head_steps_at(step, self.steps)
            now = self.still_masked(step, self.steps, now, start)
        return calls + (self.head_steps_at(self.steps - 1, self.steps) if tokens else 0)


@dataclass
class MARConfig:
    num_classes: int = 1000
    latent_size: int = 16  # latent grid side (image size / the tokenizer's stride)
    latent_channels: int = 16  # the tokenizer's latent channels (MAR's vae_embed_dim)
    patch_size: int = 1  # latent patches p x p form one token of latent_channels * p^2 values
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64  # class-carrying tokens prefixed to the encoder input
    mask_ratio_min: float = 0.7  # training mask ratio ~ truncated N(1, 0.25) on [mask_ratio_min, 1]
    class_dropout: float = 0.1  # class -> fake_latent in training, for classifier-free guidance
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    head_depth: int = 3  # residual blocks of the diffusion MLP (diffloss_d)
    head_width: int = 1024  # its width (diffloss_w)
    diffusion_batch_mul: int = 4  # noise samples per token in the diffusion loss
    head_prediction: str = "eps"  # what the head predicts: "eps" (MAR's) or "v" (see argen.diffusion)

    def __post_init__(self) -> None:
        for name in ("num_classes", "latent_size", "latent_channels", "patch_size", "encoder_dim", "encoder_depth"):
            check_int(self, name)
        for name in ("encoder_heads", "decoder_dim", "decoder_depth", "decoder_heads", "head_depth", "head_width"):
            check_int(self, name)
        check_int(self, "buffer_size", minimum=0)
        check_int(self, "diffusion_batch_mul")
        check_number(self, "mlp_ratio", above=0)
        check_number(self, "mask_ratio_min", above=0.0, at_most=1.0)
        if self.head_prediction not in PREDICTIONS:
            raise ConfigError(f"MARConfig: head_prediction={self.head_prediction!r} is not one of {PREDICTIONS}")
        for name in ("class_dropout", "attn_dropout", "proj_dropout"):
            check_probability(self, name)
        if self.latent_size % self.patch_size:
            raise ConfigError(
                f"MARConfig: latent_size={self.latent_size} is not a multiple of patch_size={self.patch_size}"
            )
        for dim, heads in (("encoder_dim", "encoder_heads"), ("decoder_dim", "decoder_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ConfigError(
                    f"MARConfig: {dim}={getattr(self, dim)} is not divisible by {heads}={getattr(self, heads)}"
                )

    @staticmethod
    def data_fields(seq_len: int, tokenizer: Any | None) -> dict[str, Any]:
        """What the training data fixes: the latent grid and channels of the KL tokenizer whose latents the
        shards hold (one token per latent position)."""
        from argen.data.shards import token_values

        if tokenizer is None or token_values(tokenizer) != "continuous":
            raise ConfigError("MAR trains on a KL tokenizer's latents: pass that tokenizer with --tokenizer")
        if tokenizer.seq_len != seq_len:
            raise ConfigError(f"the tokenizer makes {tokenizer.seq_len} latents per image, the shards hold {seq_len}")
        return {"latent_size": tokenizer.grid_size, "latent_channels": tokenizer.token_dim}

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size**2


class Attention(nn.Module):
    """timm's ViT attention: fused qkv with bias, no masking."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, proj_dropout: float):
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        out = attention(q, k, v, None, dropout=dropout)  # (B, H, N, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """timm's pre-norm ViT block (LayerNorm eps 1e-6, GELU MLP), the names MAR's checkpoints use."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_dropout: float, proj_dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dropout, proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        self.mlp_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.mlp_drop(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + self.mlp_drop(self.mlp.fc2(h))


def truncated_normal_ratio(mask_ratio_min: float, std: float = 0.25) -> float:
    """One draw (global RNG) of MAR's mask ratio: N(1, std) truncated to [mask_ratio_min, 1] (§3.4), by inverse CDF."""
    low = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / std, dtype=torch.float64))
    u = low + torch.rand((), dtype=torch.float64) * (0.5 - low)  # ndtr(0) = 0.5: the upper end is the mean
    return float(1.0 + std * torch.special.ndtri(u))


@register
class MARTransformer(nn.Module, Pretrained):
    component_type = "mar_transformer"
    config_class = MARConfig
    # MAR §4 (after Muse): guidance grows linearly with the share of tokens known.
    order = OrderSpec(
        "mar",
        policy="mar",
        values="continuous",
        options_class=MAROptions,
        # a pass reads each row's known tokens (the encoder runs rows of equal counts together), never the step
        row_steps=True,
        default_sampler=(("cfg_scale", 3.0), ("cfg_schedule", "linear")),
    )

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = c = config
        self.num_classes, self.vocab_size = c.num_classes, 0  # no codebook: values are (D,) vectors
        self.seq_len, self.token_dim, self.buffer_size = c.grid_size**2, c.token_dim, c.buffer_size
        self.class_emb = nn.Embedding(c.num_classes, c.encoder_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, c.encoder_dim))  # the "no condition" embedding
        self.z_proj = Linear(c.token_dim, c.encoder_dim)
        self.z_proj_ln = nn.LayerNorm(c.encoder_dim, eps=1e-6)
        span = self.seq_len + c.buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, span, c.encoder_dim))
        blocks = (c.mlp_ratio, c.attn_dropout, c.proj_dropout)
        self.encoder_blocks = nn.ModuleList(
            Block(c.encoder_dim, c.encoder_heads, *blocks) for _ in range(c.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(c.encoder_dim, eps=1e-6)
        self.decoder_embed = Linear(c.encoder_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, span, c.decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, *blocks) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, c.decoder_dim))
        self._init_weights()
        self.diffloss = DiffLoss(  # its own init
            c.token_dim, c.decoder_dim, c.head_depth, c.head_width, prediction=c.head_prediction
        )

    def _init_weights(self) -> None:
        """MAR's init: N(0, 0.02) embeddings, xavier-uniform linears with zero bias, unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token):
            nn.init.normal_(p, std=0.02)
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.encoder_blocks, *self.decoder_blocks]

    # --- latents <-> tokens ---

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) tokenizer latents -> (B, L, C p^2) tokens, raster over patches, channel-major inside."""
        B, C, H, W = latents.shape
        p = self.config.patch_size
        x = latents.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C p^2) -> (B, C, H, W), the inverse of `patchify`."""
        B = tokens.shape[0]
        p, C, g = self.config.patch_size, self.config.latent_channels, self.config.grid_size
        x = tokens.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return x.reshape(B, C, g * p, g * p)

    # --- the network ---

    def class_embedding(self, condition: Condition | torch.Tensor) -> torch.Tensor:
        """(B, E): the class's row, or `fake_latent` where the condition is null."""
        condition = as_condition(condition)
        ids = condition.embedding_ids(self.num_classes).clamp(max=self.num_classes - 1)  # null rows: any row
        return torch.where(condition.null_mask[:, None], self.fake_latent, self.class_emb(ids))

    def forward_mae_encoder(self, tokens: torch.Tensor, masked: torch.Tensor, class_embedding: torch.Tensor):
        """tokens (B, L, D), masked (B, L) bool (True = unknown, dropped), class embedding (B, E) ->
        (B, buffer + most visible, E) after encoder_norm, and the (B, buffer + L) bool of the positions kept."""
        x = self.z_proj(tokens)  # (B, L, E)
        B, _, E = x.shape
        buffer = class_embedding[:, None].expand(B, self.buffer_size, E).to(x.dtype)  # all carry the class
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)  # (B, S, E)
        keep = torch.cat([masked.new_zeros(B, self.buffer_size), masked], dim=1).logical_not()  # (B, S)
        counts = keep.sum(dim=1)
        n = int(counts.max())
        if bool((counts == n).all()):  # MAR's own case: x[keep].reshape(B, -1, E)
            return self._encode_kept(x[keep].reshape(B, n, E)), keep
        # Rows keep different numbers of tokens (editing, a server's rows at different steps): each group of equal
        # counts is encoded on its own, so a row's output is what it gets alone (padding with an attention mask
        # would move it by ~1e-6, which a continuous value keeps).
        out = x.new_zeros(B, n, E)
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1)
            out[rows, :count] = self._encode_kept(x[rows][keep[rows]].reshape(len(rows), count, E))
        return out, keep

    def _encode_kept(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder blocks and norm over (B, n, E) kept tokens, as many for every row."""
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, n, E) and its kept positions (B, S) -> z (B, L, Dd) for every image position."""
        x = self.decoder_embed(x)  # (B, n, Dd)
        B, S = keep.shape
        canvas = self.mask_token.to(x.dtype).expand(B, S, -1).clone()  # (B, S, Dd)
        valid = torch.arange(x.shape[1], device=x.device) < keep.sum(dim=1, keepdim=True)  # padding excluded
        canvas[keep] = x[valid]
        x = canvas + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size :] + self.diffusion_pos_embed_learned  # (B, L, Dd)

    def z(self, tokens: torch.Tensor, masked: torch.Tensor, condition: Condition | torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D), masked (B, L) bool, B conditions -> the head's conditions z (B, L, Dd)."""
        if tokens.shape[1:] != (self.seq_len, self.token_dim) or masked.shape != tokens.shape[:2]:
            raise ValueError(
                f"tokens must be (B, {self.seq_len}, {self.token_dim}) with a (B, {self.seq_len}) mask, got "
                f"{tuple(tokens.shape)} and {tuple(masked.shape)}"
            )
        return self.forward_mae_decoder(*self.forward_mae_encoder(tokens, masked, self.class_embedding(condition)))

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The diffusion head as a callable for `argen.sampling.diffusion`: x_t (N, D), timesteps (N,) of the
        1000-step process, z (N, Dd) -> (N, 2D) predictions (eps or v, `head_schedule.prediction`) and variance
        values."""
        dtype = self.z_proj.weight.dtype  # the loop runs in float32, the weights may not
        return self.diffloss.net(x.to(dtype), t, z.to(dtype))

    @property
    def head_schedule(self):
        """The head's training diffusion process (`argen.diffusion.DiffusionSchedule`), to respace for sampling."""
        return self.diffloss.schedule

    # --- training ---

    def training_mask(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """(B, L) bool, True = masked (a target). MAR §3.4: one ratio per batch from the truncated normal, the
        first ceil(ratio L) positions of a random order per sample. Draws from the global RNG."""
        L = self.seq_len
        count = math.ceil(L * truncated_normal_ratio(self.config.mask_ratio_min))
        rank = torch.rand(batch_size, L, device=device).argsort(dim=1).argsort(dim=1)  # a random permutation
        return rank < count

    def diffusion_loss(
        self, z: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, t=None, noise=None
    ) -> torch.Tensor:
        """MAR's forward_loss: z (B, L, Dd) and target tokens (B, L, D) repeated diffusion_batch_mul times, the
        loss averaged over masked rows. t (N,) and noise (N, D) may be given (else drawn, global RNG)."""
        B, L, D = target.shape
        k = self.config.diffusion_batch_mul
        target = target.reshape(B * L, D).repeat(k, 1)
        z = z.reshape(B * L, -1).repeat(k, 1)
        weight = masked.reshape(B * L).repeat(k).float()  # the loss is summed in float32
        if t is None:
            return self.diffloss(target, z, weight)
        rows = self.diffloss.loss_rows(target, z, t, noise).loss
        return (rows * weight).sum() / weight.sum()

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """The diffusion loss on the masked tokens of (B, L, D) latent tokens, or of the tokenizer's (B, C, H, W)
        latents, patchified first as MAR's forward does (MAR eq. 2 and §3.4); the condition becomes fake_latent at
        the configured rate in training. No exact likelihood: `nll_sum` is None."""
        if tokens.dim() == 4:
            tokens = self.patchify(tokens)
        condition = as_condition(condition).to(tokens.device)
        if self.training:
            condition = condition.dropped(self.config.class_dropout)
        masked = self.training_mask(tokens.shape[0], tokens.device)
        z = self.z(tokens, masked, condition)
        loss = self.diffusion_loss(z, tokens, masked)
        return LossOutput(loss, int(masked.sum()))

    # --- the order contract (argen.models.interface): continuous values, the head samples them ---

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.config.grid_size, self.config.grid_size

    def start(self, condition: Condition | torch.Tensor, options: MAROptions | None = None) -> DecodeState:
        """An empty canvas of (B, L, D) values, every position unknown; `options.steps` steps fill it."""
        options = options or MAROptions()
        weight = self.z_proj.weight
        condition = as_condition(condition).to(weight.device)
        B = len(condition)
        tokens = torch.zeros((B, self.seq_len, self.token_dim), dtype=torch.float32, device=weight.device)
        filled = torch.zeros((B, self.seq_len), dtype=torch.bool, device=weight.device)
        extra = {"class_embedding": self.class_embedding(condition)}
        head_passes = options.head_passes(self.seq_len)
        return DecodeState(condition, tokens, filled, num_steps=options.steps, extra=extra, extra_passes=head_passes)

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        """One encoder-decoder pass over the known tokens -> the head's conditions z (B, n, Dd) at the (B, n)
        positions (by default all L)."""
        encoded = self.forward_mae_encoder(
            state.tokens.to(self.z_proj.weight.dtype), ~state.filled, state.extra["class_embedding"]
        )
        z = self.forward_mae_decoder(*encoded).float()  # (B, L, Dd)
        B = z.shape[0]
        if positions is None:
            return Prediction(torch.arange(self.seq_len, device=z.device).expand(B, -1), z=z)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.seq_len):
            raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} outside 0..{self.seq_len - 1}")
        return Prediction(positions, z=z.gather(1, positions[..., None].expand(-1, -1, z.shape[-1])))

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Commit (B, n, D) values at (B, n) positions (a repeated position carries the same value)."""
        state.commit(positions, values.to(state.tokens.dtype))


# Presets are data. "mnist-mar" pairs with the "mnist-kl" tokenizer (28 / 4 = 7 x 7 latents of 4 channels); argen train
# takes latent_size and latent_channels from the tokenizer whatever a preset says (data_fields).
MAR_PRESETS: dict[str, MARConfig] = {
    "mnist-mar": MARConfig(
        num_classes=10,
        latent_size=7,
        latent_channels=4,
        encoder_dim=128,
        encoder_depth=3,
        encoder_heads=4,
        decoder_dim=128,
        decoder_depth=3,
        decoder_heads=4,
        buffer_size=16,
        head_depth=3,
        head_width=128,
    ),
    # MAR-B as released (ImageNet 256, KL-16 latents; trained with --diffloss_d 6 --diffloss_w 1024).
    "mar-base": MARConfig(head_depth=6),
}
