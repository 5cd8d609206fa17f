"""Convolutional encoder and decoder of the VQ tokenizer (the taming-transformers design used by LlamaGen).

Module names follow LlamaGen's `vq_model.py` so that its checkpoints load by name:
`conv_blocks.{level}.res.{j}`, `.attn.{j}`, `.downsample.conv` / `.upsample.conv`, `mid.{0,1,2}`.
The decoder lists its levels in the order they run (`conv_blocks.0` is the lowest resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Without autograd the decoder runs this many bytes of its widest activation at a time (see Decoder.forward): a
# 256 px image at 128 channels is 16 MiB in bfloat16, 32 MiB in float32, so one image; 64 px images go 16 (bf16).
# Measured on one CPU thread, VQ-16 decoding a batch of 8 in bfloat16: 10.3 s CPU time whole, 9.8 s one at a time.
DECODE_CHUNK_BYTES = 16 * 2**20

# Without autograd on CPU the decoder also runs channels-last when every norm has at least this many channels per
# group. oneDNN's convolutions are ~15 % faster on channels-last activations (VQ-16 decoding 256 px images, batch 1
# and 8, float32 and bfloat16, one thread: 12.6 -> 10.9 s at batch 8 in bfloat16), but PyTorch's channels-last
# GroupNorm is 5-25x slower than its contiguous one at 1-2 channels per group (the MNIST decoders' 32-64 channels:
# those decoders got 1.5-1.8x slower), and about as fast from 4 channels per group (128 channels) up.
CHANNELS_LAST_MIN_PER_GROUP = 4


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)); without autograd the SiLU overwrites the norm's fresh output instead of allocating another
    activation (at 256 px these are tens of MB, each a round of page faults)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes, as in the official layout.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)  # in place: the convolution saves its input for backward, not its output


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, separate 1x1 q/k/v convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2).transpose(1, 2)
        v = self.v(h).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2, the official choice
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) so that H/2 comes out exactly, as the official code does.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _fold_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 taps (w0, w1, w2) along `dim` -> the 2 taps over (x[i-1], x[i]) that give output 2i, and the 2 over
    (x[i], x[i+1]) that give output 2i+1, when the input is nearest-upsampled 2x first."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def subpixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) kernel of a conv after 2x nearest upsampling -> (4*O, C, 2, 2): the four output phases
    (row parity, column parity), each a 2x2 conv on the low-resolution input. Folded in at least float32."""
    rows = _fold_taps(weight.to(torch.promote_types(weight.dtype, torch.float32)), 2)  # even, odd rows: (O, C, 2, 3)
    return torch.cat([k for r in rows for k in _fold_taps(r, 3)])


class Upsample(nn.Module):
    """2x nearest upsampling, then a 3x3 convolution (padding 1).

    Computed without the upsampled tensor: after nearest upsampling each output pixel's 3x3 window covers only
    2x2 input pixels, so the result is four 2x2 convolutions of the input, one per output phase (the sub-pixel
    form of Shi et al. 2016), interleaved: 16 instead of 36 multiply-adds per output pixel and channel pair. The
    same function of the weights (`conv.weight` keeps the official 3x3 layout); only the order of the sums
    differs, at rounding level."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        out_ch = self.conv.out_channels
        kernel = subpixel_kernel(self.conv.weight).to(x.dtype)
        # Padded by one, a valid 2x2 conv gives (H+1, W+1) outputs; phase (r, s) reads rows r.., columns s..
        out = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, self.conv.bias.repeat(4))  # (B, 4*out_ch, H+1, W+1)
        out = out.view(B, 2, 2, out_ch, H + 1, W + 1)
        # The output keeps the input's memory format (channels-last stays channels-last, see Decoder.forward).
        layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
        y = torch.empty(B, out_ch, 2 * H, 2 * W, dtype=out.dtype, device=out.device, memory_format=layout)
        phases = y.view(B, out_ch, H, 2, W, 2)  # output row 2i + r, column 2j + s
        for r in range(2):
            for s in range(2):
                phases[:, :, :, r, :, s] = out[:, r, s, :, r : r + H, s : s + W]
        return y


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, in_ch: int, out_ch: int, num_res: int, attn: bool, resample: type[nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(num_res)])
        if attn:
            self.attn = nn.ModuleList([AttnBlock(out_ch) for _ in range(num_res)])
        if resample is Downsample:
            self.downsample = Downsample(out_ch)
        elif resample is Upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if hasattr(self, "attn"):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList(
            Level(ch * in_mult[i], ch * m, num_res_blocks, attn=i == last, resample=None if i == last else Downsample)
            for i, m in enumerate(ch_mult)
        )
        top = ch * ch_mult[-1]
        self.mid = middle(top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(levels-1), w * 2^(levels-1)), not clamped.

    `attention`: self-attention after each block of the lowest-resolution level (LlamaGen, VAR); MAR's KL decoder
    has none there (`attn_resolutions=()`), only in the middle."""

    def __init__(
        self,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        attention: bool = True,
    ):
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = middle(top)
        levels, block_in = [], top
        for i, m in enumerate(reversed(ch_mult)):
            block_out = ch * m
            last = i == len(ch_mult) - 1
            levels.append(
                Level(
                    block_in,
                    block_out,
                    num_res_blocks + 1,
                    attn=attention and i == 0,
                    resample=None if last else Upsample,
                )
            )
            block_in = block_out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._forward(z)
        if z.device.type == "cpu" and self._channels_last_is_faster():
            z = z.contiguous(memory_format=torch.channels_last)  # the convolutions keep it (CHANNELS_LAST_MIN_...)
        # Without autograd, a few images at a time: activations below DECODE_CHUNK_BYTES come from reused heap
        # memory instead of fresh pages (images are independent: same results as the whole batch).
        upsampled = 4 ** (len(self.conv_blocks) - 1) * z.shape[-2] * z.shape[-1]
        image_bytes = self.norm_out.num_channels * upsampled * z.element_size()  # the widest activation
        chunk = max(1, DECODE_CHUNK_BYTES // image_bytes)
        parts = [self._forward(part) for part in z.split(chunk)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()

    def _channels_last_is_faster(self) -> bool:
        norms = [m for m in self.modules() if isinstance(m, nn.GroupNorm)]
        return min(m.num_channels // m.num_groups for m in norms) >= CHANNELS_LAST_MIN_PER_GROUP

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(norm_silu(self.norm_out, h))
