"""Zero-shot editing and progressive previews, through the pipeline, for both orders."""

import pytest
import torch

from argen.convert.var import load_transformer, load_vqvae, transformer_config
from argen.data.datasets import load_dataset
from argen.pipeline import ARPipeline
from tests.conftest import PARITY
from tests.tokenizers.test_multiscale import FIXTURE


@pytest.fixture(scope="module")
def var_pipe(var_fixture):
    fields = var_fixture[3]["transformer"]["constructor_args"]
    vq = load_vqvae(PARITY / "VAR_tokenizer.safetensors", FIXTURE)
    gen = load_transformer(PARITY / "VAR_transformer.safetensors", transformer_config(fields, 16, 1024))
    return ARPipeline(vq, gen), var_fixture[1]


def test_next_scale_edit_keeps_known_tokens_at_every_scale(var_pipe):
    pipe, ref = var_pipe
    images = ref["tok_image"]
    keep = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    keep[..., :, :32] = True  # keep the left half, regenerate the right half
    source = pipe.tokenizer.encode(images)
    known = pipe.tokenizer.token_mask(keep)
    assert known.shape == (2, 30) and 0 < known.sum() < 60
    a = pipe.edit(images, keep, [3, 3], seed=0, output_type="pt")
    b = pipe.edit(images, keep, [3, 3], seed=1, output_type="pt")
    assert torch.equal(a.tokens[known], source[known])
    assert not torch.equal(a.tokens[~known], b.tokens[~known])  # the hole is sampled
    everything = pipe.edit(images, torch.ones_like(keep), [3, 3], seed=0)
    assert torch.equal(everything.tokens, source)  # keeping all reproduces the source tokens


def test_progressive_previews_end_at_the_final_image(var_pipe):
    pipe, _ = var_pipe
    frames = list(pipe.progressive([1, 2], seed=4))
    assert len(frames) == 4 and all(f.shape == (2, 3, 64, 64) for f in frames)
    final = pipe([1, 2], seed=4, output_type="pt").images
    assert torch.allclose(frames[-1], final, atol=1e-5)
    assert not torch.allclose(frames[0], frames[-1], atol=1e-2)  # coarse preview differs from the final image


def test_raster_outpainting_below_a_kept_top_region():
    pipe = ARPipeline.from_pretrained("default")
    digits = load_dataset("mnist:test", 28).images[:2]
    keep = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
    keep[..., :12, :] = True  # top 3 token rows
    out = pipe.edit(digits, keep, [0, 0], seed=0, output_type="pt")
    source = pipe.tokenizer.encode(digits)
    assert torch.equal(out.tokens[:, :21], source[:, :21])  # 3 rows of 7 tokens kept
    assert not torch.equal(out.tokens[:, 21:], source[:, 21:])
    # raster previews are partial canvases: one per token, the last one the final image
    frames = list(pipe.progressive([1], seed=3))
    assert len(frames) == pipe.generator.seq_len
    torch.testing.assert_close(frames[-1], pipe([1], seed=3, output_type="pt").images, atol=1e-5, rtol=0)
    assert (frames[0] - frames[-1]).abs().mean() > 0.05
