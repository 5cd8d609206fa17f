import pytest
import torch
import torch.nn.functional as F

from argen.tokenizers.convnet import Decoder, Upsample


def reference_upsample(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    """The official form: materialise the 2x nearest-upsampled input, then the 3x3 convolution."""
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 16, 1, 1), (3, 4, 6, 6)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsample_is_upsample_then_conv(shape, layout):
    torch.manual_seed(0)
    up = Upsample(shape[1])
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    up = up.double()
    out = up(x)
    torch.testing.assert_close(out, reference_upsample(up, x), rtol=1e-12, atol=1e-12)
    # The decoder's channels-last run stays channels-last (a 1 x 1 map is both formats: it counts as contiguous).
    assert out.is_contiguous(memory_format=layout if not x.is_contiguous() else torch.contiguous_format)


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


@pytest.mark.parametrize("ch, expect_channels_last", [(128, True), (64, False)])
def test_decoder_runs_channels_last_only_where_its_norms_are_wide(ch, expect_channels_last):
    """Without autograd on CPU, a decoder whose norms have >= 4 channels per group runs channels-last (faster
    convolutions); narrower ones stay contiguous (PyTorch's channels-last GroupNorm is slow there). Same values
    either way, and the images come back contiguous."""
    torch.manual_seed(0)
    decoder = Decoder(z_channels=4, ch=ch, ch_mult=(1, 1), num_res_blocks=1, out_channels=3)
    z = torch.randn(3, 4, 4, 4)
    seen = []
    hook = decoder.conv_out.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    expected = decoder(z).detach()  # with autograd: contiguous, one pass
    with torch.no_grad():
        out = decoder(z)
    hook.remove()
    assert seen == [False, expect_channels_last]
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
