"""Layers shared by the generators: RMSNorm, SwiGLU feed-forward, and the one attention dispatch point."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the input dtype (LlamaGen does the same under bf16).
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def swiglu_hidden_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """LLaMA's rule: 2/3 of 4*dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return find_multiple(hidden, multiple_of)


# BLAS multiplies a matrix of very few rows with other kernels than a larger one, and they round differently: a
# sample's rows would get other values alone than beside others, and "the same seed gives the same image whatever
# the batch size" would not hold. Where the kernels switch depends on the CPU and on the shape (float32, measured:
# an AVX2 CPU under 4 rows; an AVX-512 Xeon under 4 rows at 192 -> 576, under 9 at 192 -> 512, under 11 at
# 256 -> 768, under 16 at 512 or more inputs), so it is measured on this CPU, once per shape, rather than assumed:
# an inference product of fewer rows than that is padded with zero rows (`Linear`). Products of PROBE_ROWS rows and
# more are taken to round alike (every product from the threshold up to PROBE_ROWS is checked against it; checked
# once up to 2,048 rows at five shapes on the AVX-512 CPU).
PROBE_ROWS = 64
_invariant_rows: dict[tuple, int] = {}
_unpadded = threading.local()


@contextlib.contextmanager
def rows_as_given():
    """Within it (this thread), `Linear` multiplies the rows it is given, unpadded: for counting a method's own
    FLOPs, which the padding is not part of."""
    before = getattr(_unpadded, "on", False)
    _unpadded.on = True
    try:
        yield
    finally:
        _unpadded.on = before


Product = Callable[[torch.Tensor], torch.Tensor]


def scrambled(shape: tuple[int, ...] | torch.Size, salt: int) -> torch.Tensor:
    """Values spread over [-1, 1) in no pattern a kernel could exploit, drawn from no RNG: a probe must not move
    the global generator (seeded runs) nor make generators (a request's are counted and placed). Computed in
    float64 (float32's sin of large arguments repeats values) a million at a time: a probe of a 1280 -> 16384
    head would otherwise hold ~0.5 GB of temporaries."""
    out = torch.empty(math.prod(shape))
    for start in range(0, len(out), 1 << 20):
        t = torch.arange(start, min(start + (1 << 20), len(out)), dtype=torch.float64) + 7919 * salt
        u = torch.sin(t * 12.9898 + 78.233) * 43758.5453
        out[start : start + len(t)] = (u - u.floor()) * 2 - 1  # frac() keeps the sign: floor() gives [0, 1)
    return out.reshape(shape)


def invariant_rows(make_product: Callable[[], Product], key: tuple, in_features: int, like: torch.Tensor) -> int:
    """The fewest rows from which a product (rows, in_features) -> (rows, out) gives every row the values it gets
    in a product of PROBE_ROWS rows, measured once per `key` on scrambled inputs like `like` (`make_product` is
    called only then)."""
    autocast = torch.is_autocast_enabled(like.device.type)  # autocast changes the product's dtype
    key = (*key, in_features, like.dtype, like.device.type, autocast, torch.get_num_threads())
    rows = _invariant_rows.get(key)
    if rows is None:
        product = make_product()
        x = scrambled((PROBE_ROWS, in_features), 0).to(like)
        full = product(x)
        rows = PROBE_ROWS
        while rows > 1 and torch.equal(product(x[: rows - 1]), full[: rows - 1]):
            rows -= 1
        _invariant_rows[key] = rows
    return rows


class Linear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict names) whose inference products on CPU give a row the same
    values whatever the number of rows beside it: fewer rows than this CPU's kernels round alike from
    (`invariant_rows`) are padded with zero rows, their outputs dropped. Training and other devices multiply as
    `nn.Linear` does. `bias` replaces the layer's own bias for one call (VAR's q/k/v biases)."""

    def product(self, x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x times `weight` (default: the layer's own), plus `bias`: the one place the layer multiplies."""
        return F.linear(x, self.weight if weight is None else weight, bias)

    def kernel(self, x: torch.Tensor) -> str:
        """Which product `product` takes for inputs like `x` (the probe's key)."""
        return "F.linear"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        rows = x.numel() // self.in_features
        if (
            x.device.type != "cpu"
            or rows >= PROBE_ROWS
            or rows == 0
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or torch.compiler.is_compiling()
            or getattr(_unpadded, "on", False)
        ):
            return self.product(x, bias)
        key = (self.kernel(x), self.out_features, bias is not None)
        need = invariant_rows(lambda: self._probe(bias), key, self.in_features, x)
        if rows >= need:
            return self.product(x, bias)
        padded = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, need - rows))
        return self.product(padded, bias)[:rows].reshape(*x.shape[:-1], self.out_features)

    def _probe(self, bias: torch.Tensor | None) -> Product:
        """The product on scrambled weights of this layer's shape and dtype: its own may be all zeros (DiT's zeroed
        gates and output layers), which any kernel multiplies exactly, and the threshold serves every layer of the
        shape."""
        weight = scrambled(self.weight.shape, 1).to(self.weight)
        bias = None if bias is None else scrambled(bias.shape, 2).to(bias)
        return lambda x: self.product(x, bias, weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def replace_randomly(tokens: torch.Tensor, rate: float | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher-forcing inputs with each token replaced by a uniformly random code with probability `rate` (the
    orders' `input_noise`; a tensor broadcastable to `tokens` gives each position its own): the model learns to
    continue past a wrong token, which sampling produces and clean teacher forcing never shows it, and a small
    dataset's sequences stop repeating exactly each epoch."""
    if not isinstance(rate, torch.Tensor) and not rate:
        return tokens
    noisy = torch.rand(tokens.shape, device=tokens.device) < rate
    return torch.where(noisy, torch.randint_like(tokens, vocab_size), tokens)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/LlamaGen initialisation of linear and embedding weights (`model.apply(init_normal)`)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)


# Score matrices (queries x keys) up to this size are faster through the explicit path than through the fused
# kernel on CPU in bfloat16/float16: measured on one thread, one query per row (a raster decode step) 16 rows x 128
# keys 0.8 ms vs 2.8 ms, VAR's 13x13 map (169 x 424) 10 vs 17 ms; its 16x16 map (256 x 680) is faster fused.
CPU_LOW_PRECISION_EXPLICIT = 2**17


def _explicit_is_faster(x: torch.Tensor, queries: int, keys: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
        and queries * keys <= CPU_LOW_PRECISION_EXPLICIT
    )


def fewest_exact_keys(x: torch.Tensor, queries: int, keys: int) -> int:
    """The fewest of `keys` keys that `attention` of `queries` queries, inputs like `x`, may be cut to (the keys
    after the last one any query attends left out, rounded to the KV cache's 32-key blocks) and still give
    bit-identical outputs; `keys` itself where no cut is exact. A cut is exact on the explicit CPU path in bfloat16:
    its products and float32 softmax add the masked keys' exact zeros without changing the order of the rest
    (tests/models/test_layers.py checks every count of keys in use up to 256). Not at any length: under 16 keys,
    oneDNN's products take other kernels and round differently (seen at 8, 13 and 15 keys), and on an AVX-512 CPU at
    32 keys too (1-4 draws in ~1,000 at 2-16 rows x 3-12 heads), hence 64. Not of float16's products, nor of
    float32's kernels (fused or explicit), whose rounding depends on the number of keys: there a row that must not
    depend on its neighbours attends over a fixed number of keys instead."""
    exact = x.dtype == torch.bfloat16 and _explicit_is_faster(x, queries, keys)
    return min(keys, 64) if exact else keys


def padded_rows() -> dict[tuple, int]:
    """What `invariant_rows` has measured so far: key (kernel, out features, bias, in features, dtype, device,
    autocast, threads) -> the fewest rows such a product takes unpadded; fewer are padded to that many (what
    bench/row_padding.py prints)."""
    return dict(_invariant_rows)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    use_sdpa: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, T, hd); k, v: (B, H, S, hd); mask: (T, S) bool (or broadcastable
    to (B, H, T, S)), True = may attend; scale defaults to 1/sqrt(hd); `dropout` on the attention weights (training).

    `use_sdpa=False` is the reference path that the fused kernel is tested against; CPU inference in reduced
    precision takes it too where it is faster. Its softmax runs in float32 whatever the inputs' dtype.
    """
    if use_sdpa and not _explicit_is_faster(q, q.shape[-2], k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    # (k q^T)^T rather than q k^T: the same dot products (bit-identical on CPU in every shape measured), but the
    # keys are read in their stored row-major layout; as a transposed view of a KV-cache slice the bf16 batched
    # matmul copied them first. One thread, bf16: a decode step's 16 rows x 12 heads x 128 keys 0.69 -> 0.40 ms,
    # 16 queries 1.20 -> 0.45 ms, VAR's 169 x 424 map 2.6 -> 2.3 ms.
    scores = (k @ q.transpose(-2, -1)).transpose(-2, -1).float() * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.dropout(scores.softmax(dim=-1), dropout).to(v.dtype) @ v
