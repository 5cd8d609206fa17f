"""Linear layers whose bfloat16 weights are prepacked for oneDNN, for CPU inference.

`F.linear` on CPU in bfloat16 reorders the weight into oneDNN's blocked layout on every call. A sampling loop calls
each layer hundreds of times with a few rows (a decode step of GPT-B at batch 8 with guidance: 16 rows), so the
reorder costs as much as the product: measured on one thread, 16 rows x 768 -> 2304 0.37 ms plain against 0.30 ms
prepacked, the 768 -> 16384 head 4.8 ms against 2.9 ms, and twice as fast at 2 rows. The outputs are bit-identical
(`tests/models/test_packed_linear.py`).

`pack_linears(module)` turns a module's linear layers (`nn.Linear`, `layers.Linear`) into `PackedLinear` in
place: the same parameters and state-dict names, a packed copy made on first use and remade when the weight
changes (another tensor, or written in place), and plain `F.linear` whenever packing does not apply (training,
autograd, another device or dtype), so a packed module still trains and moves like any other. The packed copy
doubles those weights' memory. As a `layers.Linear`, it pads products of few rows like any inference linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from argen.models.layers import Linear


def packing_available() -> bool:
    """Whether this CPU and build run oneDNN's bfloat16 linear (AVX-512 BF16 / AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(Linear):
    """A `layers.Linear` that, in bfloat16 CPU inference, multiplies by a prepacked copy of its weight."""

    def _applies(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (
            not self.training
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and w.device.type == "cpu"
            and w.dtype == torch.bfloat16
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
        )

    def kernel(self, x: torch.Tensor) -> str:
        return "packed" if self._applies(x) else "F.linear"

    def product(self, x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor | None = None) -> torch.Tensor:
        if not self._applies(x):
            return F.linear(x, self.weight if weight is None else weight, bias)
        if weight is not None:  # another weight (the padding's probe): packed for this call
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            # the batch hint only picks oneDNN's blocking; the packed weight serves any number of rows
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16))
            self.__dict__["_packed"] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [None], "")

    def __getstate__(self) -> dict[str, Any]:
        # the packed copy is an opaque oneDNN tensor: copies and pickles remake it on first use
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def pack_linears(module: nn.Module) -> int:
    """Make every plain `nn.Linear` or `layers.Linear` in `module` a `PackedLinear` (in place); the number
    converted. Nothing when this CPU has no oneDNN bfloat16 linear."""
    if not packing_available():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) in (nn.Linear, Linear):
            layer.__class__ = PackedLinear
            count += 1
    return count


def unpack_linears(module: nn.Module) -> int:
    """Undo `pack_linears`: every `PackedLinear` in `module` becomes a `layers.Linear` (its packed copy
    dropped); the number converted. For side-by-side measurements and tests."""
    count = 0
    for layer in module.modules():
        if type(layer) is PackedLinear:
            layer.__dict__.pop("_packed", None)
            layer.__class__ = Linear
            count += 1
    return count
