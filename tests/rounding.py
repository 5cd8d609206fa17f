"""Known CPU-dependent rounding that breaks a bit-for-bit invariance test (a marker, not a tolerance)."""

import pytest
import torch

# On an AVX-512 CPU (seen on a Xeon with torch 2.13) BLAS multiplies matrices of under ~16 rows with other kernels
# than larger ones, and oneDNN's bfloat16 score product rounds differently by key count. A raster or random-order
# decode pass of a few rows (one query per row) then gives a row other logits beside rows at other steps than alone,
# and the bfloat16 cut to the cache's blocks is not exact at every shape there. MAR and the diffusion head pad their
# passes to MIN_GEMM_ROWS (argen.models.layers). The per-position orders do not yet: the same padding around their
# decode-path linears fixes all but the bfloat16 cut, but costs 1.35x at batch 1 on the shipped raster model, so it
# waits for a version that pads only where invariance is promised (a server's mixed batch). Open: the tests below
# fail on such a CPU and stay to show when it is fixed.
AVX512_SMALL_PRODUCTS = pytest.mark.xfail(
    torch.backends.cpu.get_cpu_capability() == "AVX512",
    reason="AVX-512 BLAS rounds products of few rows differently; decode rows are not padded yet (tests/rounding.py)",
    strict=False,
)
