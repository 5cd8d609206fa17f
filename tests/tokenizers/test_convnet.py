import pytest
import torch
import torch.nn.functional as F

from argen.tokenizers.convnet import Decoder, Upsample


def reference_upsample(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    """The official form: materialise the 2x nearest-upsampled input, then the 3x3 convolution."""
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 16, 1, 1), (3, 4, 6, 6)])
def test_subpixel_upsample_is_upsample_then_conv(shape):
    torch.manual_seed(0)
    up = Upsample(shape[1])
    x = torch.randn(shape, dtype=torch.float64)
    up = up.double()
    torch.testing.assert_close(up(x), reference_upsample(up, x), rtol=1e-12, atol=1e-12)


def test_subpixel_upsample_gradients_match():
    torch.manual_seed(0)
    up = Upsample(8).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    grads = []
    for forward in (up, lambda t: reference_upsample(up, t)):
        up.zero_grad()
        x.grad = None
        (
            forward(x) * torch.randn(2, 8, 8, 10, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        ).sum().backward()
        grads.append((x.grad.clone(), up.conv.weight.grad.clone(), up.conv.bias.grad.clone()))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_decoder_same_with_and_without_autograd():
    """Without autograd the SiLUs and residual adds run in place; the values must not change."""
    torch.manual_seed(0)
    decoder = Decoder(z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, out_channels=3)
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = decoder(z)
    torch.testing.assert_close(decoder(z).detach(), expected, rtol=0, atol=0)
