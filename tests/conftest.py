import json
import os
from pathlib import Path

# Before torch starts its thread pool: busy-waiting threads slow a loaded 2-core machine badly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"

# Small CPU tests: one thread avoids the slow-down two busy threads show on a loaded 2-core machine.
torch.set_num_threads(1)


def _fixture(name: str):
    if not PARITY.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY} (../shared/parity beside the repo; a user clone has none)")
    weights = {
        part: {
            k: v.float() if v.is_floating_point() else v
            for k, v in load_file(PARITY / f"{name}_{part}.safetensors").items()
        }
        for part in ("transformer", "tokenizer")
    }
    ref = load_file(PARITY / f"{name}_reference.safetensors")
    ref = {k: v.float() if v.dtype == torch.float16 else v for k, v in ref.items()}
    meta = json.loads((PARITY / f"{name}_reference.json").read_text())
    config_path = PARITY / f"{name}_config.json"  # MAR's constructors are in its reference JSON instead
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return weights, ref, meta, config


@pytest.fixture(scope="session")
def llamagen_fixture():
    return _fixture("LlamaGen")


@pytest.fixture(scope="session")
def var_fixture():
    return _fixture("VAR")


@pytest.fixture(scope="session")
def mar_fixture():
    return _fixture("MAR")


def assert_close_ref(actual: torch.Tensor, name: str, ref: dict, meta: dict) -> None:
    """Compare with the sidecar's own tolerance (|a - r| <= atol + rtol |r|), or exactly for integers."""
    expected = ref[name]
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    )
    if not expected.is_floating_point():
        assert torch.equal(actual.long().cpu(), expected.long()), f"{name}: ids differ"
        return
    entry = meta["tensors"][name]
    tol = entry.get("tolerance", {"atol": entry.get("atol"), "rtol": entry.get("rtol")})  # MAR: at the top level
    err = (actual.float().cpu() - expected).abs()
    bound = tol["atol"] + tol["rtol"] * expected.abs()
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g} exceeds tolerance {tol}"


def tiny_vq(image_size: int = 16, codebook_size: int = 16, **overrides):
    """A seeded one-channel VQ tokenizer small enough for unit tests (downsample 2)."""
    from argen.tokenizers.vq import VQConfig, VQTokenizer

    fields = dict(
        image_size=image_size,
        image_channels=1,
        codebook_size=codebook_size,
        codebook_embed_dim=4,
        ch=32,
        encoder_ch_mult=(1, 2),
        decoder_ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=8,
    )
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(**{**fields, **overrides}))


def tiny_raster(**overrides):
    """A seeded raster generator small enough for unit tests."""
    from argen.models.raster import RasterConfig, RasterTransformer

    fields = dict(vocab_size=32, num_classes=3, grid_size=3, dim=32, num_layers=2, num_heads=4, multiple_of=16)
    torch.manual_seed(0)
    return RasterTransformer(RasterConfig(**{**fields, **overrides})).eval()
