"""A second device on a CPU-only machine, to catch tensors left behind by library code.

`OnDevice` is a CPU tensor that *reports* itself on the `meta` device (so `x.device`, `device=x.device`,
`.to(x.device)` and module moves all see a device that is not the CPU), and `DeviceGuard` is the dispatch mode
that runs every aten op on the real CPU data underneath. Inside the guard:

- a factory given `device=<the fake device>` makes an `OnDevice` tensor; one given no device makes a plain CPU
  tensor, exactly as it would when the model sits on a GPU;
- an op that mixes an `OnDevice` tensor with a plain CPU tensor of one element or more raises `DeviceLeak`
  (CUDA allows only 0-dim CPU scalars there), except where CUDA itself accepts a CPU operand (copies, moves,
  CPU index tensors);
- with `dtype=` set, an op that mixes floating tensors of the model's dtype with float32 ones raises
  `DtypeLeak` (a `torch.zeros(...)` without `dtype=` meeting a bfloat16 or float64 model).

The meta device is used because PyTorch's autograd engine runs its backward on the CPU queue, so a full
training step works through it; a fake CUDA device would need CUDA's runtime.
"""

from __future__ import annotations

import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FAKE = torch.device("meta")
aten = torch.ops.aten

# Ops that CUDA accepts with a CPU tensor beside a device tensor.
CROSSING = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.lift_fresh.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten._index_put_impl_.default,
    aten.index_put.default,
}


class DeviceLeak(AssertionError):
    pass


class DtypeLeak(AssertionError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor (`.inner`) that says it is on the fake device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        assert not isinstance(inner, OnDevice)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=FAKE,
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} ran on a fake-device tensor outside DeviceGuard")


def _wrap(out):
    return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t, out)


def _unwrap(tree):
    return tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, tree)


def _where() -> str:
    """The innermost line of argen's own code on the stack: where the stray tensor met the model's."""
    frames = [f for f in traceback.extract_stack() if "/argen/" in f.filename and "/tests/" not in f.filename]
    return f" at {frames[-1].filename.split('/argen/')[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""


def _tensors(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) else None, tree)
    return found


class DeviceGuard(TorchDispatchMode):
    """Run ops on the CPU while checking that model-side tensors never meet stray CPU tensors; with `dtype`,
    also that argen's own calls never mix float32 with the model's dtype (checked where argen calls torch, not
    inside torch's kernels, which may upcast on purpose)."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.dtypes = DtypeGuard(dtype) if dtype is not None else None
        self.ops = 0

    def __enter__(self):
        if self.dtypes is not None:
            self.dtypes.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.dtypes is not None:
            self.dtypes.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.ops += 1
        tensors = _tensors((args, kwargs))
        on_device = [t for t in tensors if isinstance(t, OnDevice)]
        host = [t for t in tensors if not isinstance(t, OnDevice) and t.device.type == "cpu" and t.dim() > 0]
        if on_device and host and func not in CROSSING:
            shapes = [tuple(t.shape) for t in host]
            raise DeviceLeak(f"{func}: CPU tensors of shapes {shapes} meet tensors on the model's device{_where()}")
        to_device = bool(on_device)
        if kwargs.get("device") is not None:
            to_device = torch.device(kwargs["device"]) == FAKE
            if to_device:
                kwargs["device"] = torch.device("cpu")
        if func is aten.copy_.default:
            to_device = isinstance(args[0], OnDevice)
        out = func(*_unwrap(args), **_unwrap(kwargs))
        if func._schema.is_mutable and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
            return args[0]  # an in-place op returns its (possibly wrapped) first argument itself
        if func is aten._local_scalar_dense.default:
            return out
        return _wrap(out) if to_device else out


# Calls that convert dtypes on purpose: their arguments may differ.
CONVERSIONS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "copy_", "__set__", "__setitem__"}


def _called_from_model_code() -> bool:
    """Whether the torch call being checked was made by argen, or by a torch layer's forward argen called
    (not by torch's own machinery, such as Module.to)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename in (__file__, torch.overrides.__file__)):
        frame = frame.f_back
    name = frame.f_code.co_filename if frame is not None else ""
    argen = "/argen/" in name and "/tests/" not in name
    layer = "torch/nn/modules/" in name and not name.endswith("/module.py")
    return argen or layer or "torch/nn/functional" in name


class DtypeGuard(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in CONVERSIONS and _called_from_model_code():
            floating = {t.dtype for t in _tensors((args, kwargs)) if t.is_floating_point() and t.dim() > 0}
            if self.dtype in floating and torch.float32 in floating:
                raise DtypeLeak(f"{func.__name__}: float32 tensors meet the model's {self.dtype} tensors{_where()}")
        return func(*args, **kwargs)
