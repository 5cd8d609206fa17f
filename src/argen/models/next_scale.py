"""Next-scale generator: VAR's transformer ("Visual Autoregressive Modeling", Tian et al. 2024).

One step predicts a whole token map: scale k's pn_k x pn_k tokens from the class and every coarser map.
Sequence = [start token, then each scale's map row-major]; a token sees its own and all coarser scales
(block-causal, VAR §3.2). The input of scale k is the accumulated f_hat of scales < k shrunk to pn_k x pn_k,
so the generator needs the tokenizer's codebook and phi convolutions: `bind(tokenizer)` attaches them
(they are not part of the generator's weights, as in VAR). Parameter names match VAR's `VAR` class, so
official `var_d*.pth` checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_probability, check_sizes
from argen.models.interface import Condition, DecodeState, LossOutput, OrderSpec, Prediction, as_condition
from argen.models.layers import Linear, attention, replace_randomly
from argen.models.scale_cache import ScaleKVCache
from argen.pretrained import Pretrained, register


@dataclass(frozen=True)
class NextScaleOptions:
    """Next-scale sampler options, both lossy accelerations of the step itself (off by default)."""

    prune: float = 0.0  # fraction of the largest map's tokens the later layers skip (FastVAR)
    prune_scales: int = 2  # how many of the largest scales are pruned (the ratio falls linearly before)
    kv_budget: int = 0  # KV entries a refiner layer keeps after each scale (ScaleKV); 0 = all
    kv_drafters: int = 1  # layers with the widest attention, which keep their whole cache

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"prune must be in [0, 1), got {self.prune}")
        if self.prune_scales < 1 or self.kv_budget < 0 or self.kv_drafters < 0:
            raise ConfigError(
                f"prune_scales must be >= 1 and kv_budget, kv_drafters >= 0, got {self.prune_scales}, "
                f"{self.kv_budget}, {self.kv_drafters}"
            )


@dataclass
class NextScaleConfig:
    vocab_size: int = 4096
    num_classes: int = 1000
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    token_dim: int = 32  # the tokenizer's code vector size (VAR's Cvae)
    depth: int = 16
    dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    class_dropout: float = 0.1
    drop_path: float = 0.0  # stochastic depth rate of the last block (linearly increasing), training only
    drop_rate: float = 0.0  # dropout on the attention projection's and the FFN's outputs (VAR's), training only
    input_noise: float = 0.0  # random-code rate on the last input map in training, ramping from 0 (input_noise_maps)
    input_noise_maps: int = 0  # how many of the last input maps the noise ramps over; 0: all of them

    def __post_init__(self) -> None:
        check_int(self, "vocab_size", minimum=2)
        for name in ("num_classes", "token_dim", "depth", "dim", "num_heads"):
            check_int(self, name)
        check_sizes(self, "scales")
        if list(self.scales) != sorted(set(self.scales)):
            raise ConfigError(f"NextScaleConfig.scales must grow strictly, got {self.scales}")
        check_number(self, "mlp_ratio", above=0)
        check_number(self, "norm_eps", above=0)
        check_probability(self, "class_dropout")
        check_probability(self, "drop_path")
        check_probability(self, "drop_rate")
        check_probability(self, "input_noise")
        check_int(self, "input_noise_maps", minimum=0)
        if self.input_noise_maps > len(self.scales) - 1:
            raise ConfigError(
                f"NextScaleConfig.input_noise_maps={self.input_noise_maps}: only {len(self.scales) - 1} of the "
                f"{len(self.scales)} maps are inputs"
            )
        if self.dim % self.num_heads:
            raise ConfigError(f"NextScaleConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.scales)

    @staticmethod
    def data_fields(seq_len: int, tokenizer: Any | None) -> dict[str, Any]:
        """The fields the training data fixes: the multi-scale tokenizer's maps and code size."""
        if tokenizer is None:
            raise ConfigError("a next-scale generator trains through its tokenizer: pass --tokenizer")
        return {"scales": list(tokenizer.scales), "token_dim": tokenizer.config.z_channels}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, l2_norm: bool, drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.l2_norm = num_heads, dim // num_heads, l2_norm
        self.mat_qkv = Linear(dim, 3 * dim, bias=False)
        # VAR's qkv bias: learnable for q and v, fixed zeros for k (a key bias cannot change the softmax).
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        if l2_norm:
            # Cosine attention with a learnable per-head temperature, capped at 100 (VAR §4, from Swin v2).
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_log_scale = math.log(100)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: ScaleKVCache | None, layer: int, start: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = self.mat_qkv(x, bias).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        scale = None
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp(max=self.max_log_scale).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
            if cache.wants_scores(layer):
                cache.observe(layer, q, k, self.head_dim**-0.5 if scale is None else scale)
        out = attention(q, k, v, mask, scale=scale)  # (B, H, T, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm gains/shifts and residual gates come from the class (AdaLN)."""

    def __init__(self, c: NextScaleConfig, drop_path: float):
        super().__init__()
        self.dim, self.drop_path = c.dim, drop_path
        self.attn = SelfAttention(c.dim, c.num_heads, c.attn_l2_norm, c.drop_rate)
        self.ffn = FFN(c.dim, round(c.dim * c.mlp_ratio), c.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(c.dim, eps=c.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(c.dim, 6 * c.dim))

    def _residual(self, h: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole branch per sample in training."""
        if not self.training or self.drop_path == 0:
            return h
        keep = torch.rand(h.shape[0], 1, 1, device=h.device) >= self.drop_path
        return h * keep / (1 - self.drop_path)

    def forward(self, x, cond, mask, cache, layer, start):
        # The class does not change between scales: a decode computes the 6D-wide projection (a third of the
        # block's weights) once and keeps it in its cache.
        ada = cache.modulation[layer] if cache is not None else None
        if ada is None:
            ada = self.ada_lin(cond).view(-1, 1, 6, self.dim)
            if cache is not None:
                cache.modulation[layer] = ada
        # VAR's split order of the 6C conditioning vector
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, mask, cache, layer, start)
        x = x + self._residual(h * gamma1)
        h = self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2)
        return x + self._residual(h * gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(h) * (1 + scale) + shift


@register
class NextScaleTransformer(nn.Module, Pretrained):
    component_type = "next_scale_transformer"
    config_class = NextScaleConfig
    order = OrderSpec(
        "next-scale",
        options_class=NextScaleOptions,
        reads_tokenizer=True,
        # measured on the shipped model, trained with dropout (docs/quality.md): a regularised model is
        # class-faithful unguided, so light guidance on VAR's ramp and a little token temperature for variety
        default_sampler=(("cfg_scale", 1.5), ("cfg_schedule", "var_ramp"), ("temperature", 1.15)),
    )

    def __init__(self, config: NextScaleConfig):
        super().__init__()
        self.config = c = config
        self.num_classes, self.vocab_size, self.seq_len = c.num_classes, c.vocab_size, c.seq_len
        self.scales = tuple(c.scales)
        self.bounds = [0]
        for pn in self.scales:
            self.bounds.append(self.bounds[-1] + pn * pn)  # scale k spans bounds[k]:bounds[k+1]
        L, first = c.seq_len, self.scales[0] ** 2
        self.word_embed = Linear(c.token_dim, c.dim)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)
        self.pos_start = nn.Parameter(torch.zeros(1, first, c.dim))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, c.dim))
        self.lvl_embed = nn.Embedding(len(self.scales), c.dim)
        rates = torch.linspace(0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(c, r) for r in rates)
        self.head_nm = AdaLNBeforeHead(c.dim, c.norm_eps)
        self.head = Linear(c.dim, c.vocab_size)
        # Part of VAR's checkpoints: the scale index of each token and the block-causal additive mask.
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.scales)])
        self.register_buffer("lvl_1L", level.view(1, L))
        bias = torch.where(level[:, None] >= level[None, :], 0.0, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, L, L))
        self._init_weights()
        self._tokenizer: tuple = ()

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the units FSDP shards and activation checkpointing recomputes."""
        return list(self.blocks)

    def _init_weights(self) -> None:
        std = math.sqrt(1 / self.config.dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for block in self.blocks:  # start near identity: small residual gates (VAR's init_adaln_gamma idea)
            block.ada_lin[-1].weight.data[: 2 * self.config.dim].mul_(1e-2)
        self.head.weight.data.mul_(0.02)

    # --- the tokenizer this generator reads its inputs through ---

    def bind(self, tokenizer: nn.Module) -> NextScaleTransformer:
        """Attach the multi-scale tokenizer (codebook + phi) used to build next-scale inputs; not a submodule."""
        if tuple(tokenizer.scales) != self.scales or tokenizer.vocab_size != self.vocab_size:
            raise ValueError(
                f"tokenizer scales {tokenizer.scales} / vocabulary {tokenizer.vocab_size} do not match "
                f"the generator's {self.scales} / {self.vocab_size}"
            )
        self._tokenizer = (tokenizer,)
        return self

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.double()`, ... move and cast the bound tokenizer with the generator: it is not a
        submodule (its weights stay out of this state_dict, parameters() and checkpoints), yet every input this
        generator builds goes through it, so it must sit on the same device in the same dtype."""
        super()._apply(fn, recurse)
        if getattr(self, "_tokenizer", ()):  # _apply may run before __init__ sets it
            self._tokenizer[0]._apply(fn, recurse)
        return self

    @property
    def tokenizer(self) -> nn.Module:
        if not self._tokenizer:
            raise ValueError("a next-scale generator needs its tokenizer: call generator.bind(tokenizer) first")
        return self._tokenizer[0]

    def training_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L - first, token_dim) inputs of scales 1..K-1 (from the accumulated f_hat)."""
        tok = self.tokenizer
        with torch.no_grad():
            return tok.quantize.next_scale_inputs(tok.split(tokens), tok.side)

    # --- forward passes ---

    def _level_pos(self, start: int, end: int) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L[:, start:end]) + self.pos_1LC[:, start:end]  # (1, T, D)

    def forward(self, inputs: torch.Tensor, condition: Condition | torch.Tensor) -> torch.Tensor:
        """Teacher forcing on all scales at once. inputs: (B, L - first, token_dim) from `training_inputs`,
        condition: B classes -> logits (B, L, V)."""
        L = self.seq_len
        if inputs.dim() != 3 or inputs.shape[1] != L - self.bounds[1]:
            raise ValueError(
                f"inputs must be (B, {L - self.bounds[1]}, {self.config.token_dim}), got {tuple(inputs.shape)}"
            )
        cond = self.class_emb(as_condition(condition).embedding_ids(self.num_classes))  # (B, D)
        start = cond[:, None] + self.pos_start  # (B, first, D)
        # The tokenizer's f_hat arrives in its own dtype; FSDP's mixed precision casts only this module's weights.
        inputs = inputs.to(self.word_embed.weight.dtype)
        x = torch.cat([start, self.word_embed(inputs)], dim=1) + self._level_pos(0, L)  # (B, L, D)
        mask = self.attn_bias_for_masking[0, 0] == 0  # (L, L) block-causal
        for i, block in enumerate(self.blocks):
            x = block(x, cond, mask, None, i, 0)
        return self.head(self.head_nm(x, cond)).float()

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """Cross-entropy over every scale's tokens (B, L), each map predicted from the coarser ones (VAR §3.2)."""
        inputs = tokens
        if self.training:
            condition = condition.dropped(self.config.class_dropout)
            if self.config.input_noise:  # no draw otherwise: a run without noise keeps its random stream
                inputs = replace_randomly(tokens, self._input_noise_rates(tokens.device), self.config.vocab_size)
        logits = self(self.training_inputs(inputs), condition)  # (B, L, V); the targets stay clean
        return LossOutput.cross_entropy(logits, tokens)

    def _input_noise_rates(self, device: torch.device) -> torch.Tensor:
        """(L,) per-token input-noise rate, growing linearly to `input_noise` at the last input map over the last
        `input_noise_maps` input maps (all of them by default: 0 on the first map) and 0 before them. A wrong token
        on the coarsest maps redraws the whole layout, which uniform noise showed (docs/quality.md), while on the fine
        maps it is a local slip, as in raster. Noise on the last input map only (`input_noise_maps=1`) aims at the
        finest map, whose codes the generator otherwise looks up by the coarse maps it has seen."""
        inputs = len(self.scales) - 1  # the last map is only a target
        window = self.config.input_noise_maps or inputs - 1
        first = inputs - 1 - window  # the map before the window: rate 0
        ramp = [min(max((i - first) / max(window, 1), 0.0), 1.0) for i in range(len(self.scales))]
        rates = torch.cat([torch.full((pn * pn,), r, device=device) for pn, r in zip(self.scales, ramp, strict=True)])
        return rates * self.config.input_noise

    # --- the order contract (argen.models.interface): one scale per step ---

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.scales[-1], self.scales[-1]

    def start(self, condition: Condition | torch.Tensor, options: NextScaleOptions | None = None) -> DecodeState:
        """Begin decoding. `options.prune` > 0 leaves that fraction of tokens out of the later layers at the
        largest scale (half of it at the one before when prune_scales = 2, ...; FastVAR); `kv_budget` > 0 caps
        the KV entries of all but `kv_drafters` layers (ScaleKV). Both are lossy."""
        o = options or NextScaleOptions()
        if o.prune_scales >= len(self.scales):
            raise ConfigError(f"prune_scales must be in 1..{len(self.scales) - 1}, got {o.prune_scales}")
        c, tok, weight = self.config, self.tokenizer, self.head.weight
        condition = as_condition(condition).to(weight.device)
        B = len(condition)
        tokens = torch.zeros((B, self.seq_len), dtype=torch.long, device=weight.device)
        filled = torch.zeros((B, self.seq_len), dtype=torch.bool, device=weight.device)
        f_hat = weight.new_zeros(B, c.token_dim, tok.side, tok.side)
        extra = {
            "cond": self.class_emb(condition.embedding_ids(self.num_classes)),
            "f_hat": f_hat,
            "next_input": None,
            "prune": self._prune_ratios(o.prune, o.prune_scales),
            "layer_out": None,  # every block's output at the previous scale: what pruned slots are restored from
        }
        cache = ScaleKVCache(len(self.blocks), o.kv_budget, o.kv_drafters)
        return DecodeState(condition, tokens, filled, num_steps=len(self.scales), cache=cache, extra=extra)

    def _prune_ratios(self, prune: float, prune_scales: int) -> list[float]:
        """Per scale, the fraction of its tokens pruned: `prune` at the largest, falling linearly before it."""
        K = len(self.scales)
        return [prune * max(0.0, 1 - (K - 1 - k) / prune_scales) for k in range(K)]

    def _scale_positions(self, state: DecodeState, positions: torch.Tensor | None) -> torch.Tensor:
        """The (B, pn*pn) positions of the current scale; a next-scale step cannot predict any others."""
        if state.done:
            raise ValueError("decoding is finished: all scales are chosen")
        begin, end = self.bounds[state.step], self.bounds[state.step + 1]
        own = torch.arange(begin, end, device=state.tokens.device).expand(len(state.tokens), -1)
        if positions is not None and not torch.equal(positions, own):
            raise ValueError(f"a next-scale step predicts the whole map {state.step} (positions {begin}..{end - 1})")
        return own

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        positions = self._scale_positions(state, positions)
        si = state.step
        begin, end = self.bounds[si], self.bounds[si + 1]
        cond = state.extra["cond"]
        if si == 0:
            x = cond[:, None] + self.pos_start
        else:
            x = self.word_embed(state.extra["next_input"].to(self.word_embed.weight.dtype))
        x = x + self._level_pos(begin, end)  # (B, pn*pn, D)
        # Every cached key is of a coarser scale or this one: block-causal needs no mask step by step.
        keep = x.shape[1] - int(x.shape[1] * state.extra["prune"][si])
        previous = state.extra["layer_out"]
        outputs = []
        for i, block in enumerate(self.blocks):
            if keep < x.shape[1] and i >= self._first_pruned_layer():
                x = self._pruned_block(block, i, x, keep, previous[i], cond, state.cache, begin)
            else:
                x = block(x, cond, None, state.cache, i, begin)
            outputs.append(x)
        state.extra["layer_out"] = outputs
        state.cache.compress()
        return Prediction(positions, self.head(self.head_nm(x, cond)).float())  # logits (B, pn*pn, V)

    def _first_pruned_layer(self) -> int:
        # The first layers still mix the new map with the coarse context; FastVAR prunes only later ones.
        return max(1, len(self.blocks) // 8)

    def _pruned_block(self, block, i, x, keep, previous, cond, cache, begin) -> torch.Tensor:
        """FastVAR's cached token pruning: run the block only on the `keep` tokens farthest from the map's mean
        (the detail still changing at this scale); the others take the block's output at the previous scale,
        enlarged to this map's size."""
        B, T, D = x.shape
        distance = (x - x.mean(1, keepdim=True)).square().sum(-1)  # (B, T)
        index = distance.topk(keep, dim=1).indices[..., None].expand(-1, -1, D)  # (B, keep, D)
        kept = block(x.gather(1, index), cond, None, cache, i, begin)
        side, prev_side = math.isqrt(T), math.isqrt(previous.shape[1])
        grid = previous.transpose(1, 2).reshape(B, D, prev_side, prev_side)
        restored = F.interpolate(grid, size=(side, side), mode="area").flatten(2).transpose(1, 2)
        return restored.scatter(1, index, kept)

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        self._scale_positions(state, positions)
        si = state.step
        begin, end = self.bounds[si], self.bounds[si + 1]
        ids = values
        state.tokens[:, begin:end] = ids
        state.filled[:, begin:end] = True
        q, side = self.tokenizer.quantize, self.tokenizer.side
        state.extra["f_hat"] = state.extra["f_hat"] + q.residual_step(q.code_map(ids), si, side)
        if si + 1 < len(self.scales):
            pn = self.scales[si + 1]
            f = F.interpolate(state.extra["f_hat"], size=(pn, pn), mode="area")
            state.extra["next_input"] = f.flatten(2).transpose(1, 2)  # (B, pn*pn, token_dim)
        state.step += 1


def var_release(depth: int) -> NextScaleConfig:
    """The released var_d{depth}.pth sizes: VAR's builder ties width (64 per layer) and heads to the depth."""
    return NextScaleConfig(depth=depth, dim=64 * depth, num_heads=depth, drop_path=0.1 * depth / 24)


# Presets are data. "mnist-next-scale" is the shipped default; var-d* are the released VAR sizes (256x256).
NEXT_SCALE_PRESETS: dict[str, NextScaleConfig] = {
    "mnist-next-scale": NextScaleConfig(
        vocab_size=512, num_classes=10, scales=(1, 2, 3, 4, 5, 6, 7), token_dim=16, depth=6, dim=192, num_heads=6
    ),
    **{f"var-d{d}": var_release(d) for d in (16, 20, 24, 30)},
}
