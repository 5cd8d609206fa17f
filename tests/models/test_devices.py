"""Every order samples and trains with its model on another device and in another dtype, on a CPU-only machine.

`DeviceGuard` (tests/models/device_guard.py) makes the model's tensors report the `meta` device while their
data stays on the CPU, and fails any op where a stray CPU tensor (a `torch.zeros(...)` without `device=`) meets
them; with a dtype it also fails argen code mixing float32 into a float64 or bfloat16 model.
"""

from __future__ import annotations

import pytest
import torch

from argen.models.interface import Condition
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import generate, seeded_generators
from argen.train.optim import build_optimizer
from argen.train.tasks import OrderLoss
from tests.models.device_guard import FAKE, DeviceGuard, DeviceLeak, DtypeLeak, OnDevice
from tests.models.test_contract import ORDERS, _random_tokens

# Accelerations that take another code path, per order that supports them.
ACCELERATED = {"raster": [{"speculative": "mc-sjd", "window": 4}, {"parallel_window": 2}]}


def test_the_guard_catches_a_tensor_made_without_device_or_dtype():
    with DeviceGuard(torch.bfloat16):
        x = torch.ones(3).to(FAKE, torch.bfloat16)
        assert isinstance(x, OnDevice) and x.device == FAKE
        assert isinstance(x + torch.zeros(3, device=x.device, dtype=x.dtype), OnDevice)
        assert (x * torch.tensor(2.0)).dtype == torch.bfloat16  # 0-dim CPU scalars are fine, as on CUDA
        with pytest.raises(DeviceLeak, match="CPU tensors of shapes"):
            x + torch.zeros(3, dtype=torch.bfloat16)
        stray = torch.nn.Linear(3, 3).to(FAKE)  # a layer moved but not cast
        with pytest.raises(DtypeLeak, match="float32"):
            stray(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factory, teacher_forced", ORDERS)
def test_every_order_samples_and_trains_on_another_device(factory, teacher_forced, dtype, request):
    model, _ = factory()  # a bound tokenizer must follow the generator: nothing here moves it by hand
    order = request.node.callspec.id.split("-", 1)[1]
    settings = [{"cfg_scale": 2.0}, *ACCELERATED.get(order, [])]
    with DeviceGuard(None if dtype == torch.float32 else dtype):
        model = model.to(FAKE, dtype)
        for flat in settings:
            ids = generate(model, Condition.classes([0, 1]), SamplerConfig.from_flat(flat), seeded_generators([0, 1]))
            shape = (2, model.seq_len) if model.order.values == "discrete" else (2, model.seq_len, model.token_dim)
            assert isinstance(ids, OnDevice) and ids.shape == shape
        model.train()
        optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
        tokens = _random_tokens(model, 2, torch.Generator().manual_seed(0))
        tokens = tokens.to(FAKE, dtype) if tokens.is_floating_point() else tokens.to(FAKE)
        out = OrderLoss(model)(tokens, Condition.classes([0, 1]).to(FAKE))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        assert all(isinstance(p, OnDevice) and p.dtype == dtype for p in model.parameters())
