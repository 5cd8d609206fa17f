import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from argen.models.layers import Linear
from argen.models.packed_linear import PackedLinear, pack_linears, packing_available, unpack_linears
from argen.pipeline import ARPipeline

pytestmark = pytest.mark.skipif(not packing_available(), reason="this CPU has no oneDNN bfloat16 linear")


def packed(in_features=48, out_features=80, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias)).to(torch.bfloat16).eval()
    assert pack_linears(model) == 1
    return model[0]


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (16, 48), (3, 5, 48), (300, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_equals_plain_linear_to_the_bit(shape, bias):
    layer = packed(bias=bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
    assert "_packed" in layer.__dict__  # the packed path ran
    assert out.shape == (*shape[:-1], 80)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_repacks_when_the_weight_is_written_in_place_or_replaced():
    layer = packed()
    x = torch.randn(4, 48).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # in place: a new version of the same tensor
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not torch.equal(layer(x), before)
        layer.load_state_dict({"weight": torch.ones(80, 48), "bias": torch.zeros(80)})
        assert torch.equal(layer(x), x.float().sum(-1, keepdim=True).to(torch.bfloat16).expand(4, 80))


def test_training_autograd_and_float32_take_the_plain_path():
    layer = packed()
    x = torch.randn(4, 48).to(torch.bfloat16)
    layer(x).float().sum().backward()  # autograd on: plain F.linear, so gradients exist
    assert layer.weight.grad is not None and "_packed" not in layer.__dict__
    layer.float()
    with torch.no_grad():
        out = layer(x.float())
    assert out.dtype == torch.float32 and "_packed" not in layer.__dict__


def test_state_dict_names_copies_and_pipeline_packing():
    layer = packed()
    with torch.no_grad():
        layer(torch.randn(2, 48).to(torch.bfloat16))
    assert set(layer.state_dict()) == {"weight", "bias"}
    twin = copy.deepcopy(layer)  # the opaque packed copy is dropped, remade on use
    assert isinstance(twin, PackedLinear) and "_packed" not in twin.__dict__
    pipe = ARPipeline.from_pretrained("raster", torch_dtype=torch.bfloat16)
    linears = [m for m in pipe.generator.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    plain = ARPipeline.from_pretrained("raster").generator
    assert all(type(m) is Linear for m in plain.modules() if isinstance(m, nn.Linear))
    packed_run = pipe([3, 7, 1, 0], seed=0, output_type="pt")
    assert all("_packed" in m.__dict__ for m in linears)  # sampling took the packed path
    assert unpack_linears(pipe.generator) == len(linears)
    assert all(type(m) is Linear and "_packed" not in m.__dict__ for m in linears)
    plain_run = pipe([3, 7, 1, 0], seed=0, output_type="pt")
    assert torch.equal(packed_run.tokens, plain_run.tokens)  # the same sampling, to the last token
    assert torch.equal(packed_run.images, plain_run.images)
