"""Zero-shot editing and progressive previews through the pipeline: one known-token mechanism for every shipped
order, ids or MAR's continuous latents."""

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


def test_mar_inpainting_keeps_the_latents_and_decodes_the_kept_region_as_the_source():
    """MAR edits through the same known tokens as the discrete orders: the KL tokenizer's encode gives the scaled
    posterior means in the generator's (B, L, D) layout, kept exactly; the kept region then decodes as the source
    does (up to the decoder reaching across the seam), a free sample of the same class does not."""
    pipe = ARPipeline.from_pretrained("mar")
    data = load_dataset("mnist:test", 28)
    digits, labels = data.images[:4], data.labels[:4]
    keep = torch.zeros(4, 1, 28, 28, dtype=torch.bool)
    keep[..., :12, :] = True  # the top 3 latent rows stay, the rest is regenerated
    out = pipe.edit(digits, keep, labels, seed=0, output_type="pt")
    with torch.no_grad():
        source = pipe.tokenizer.encode(digits)
    assert source.shape == (4, 49, pipe.generator.token_dim)
    assert torch.equal(out.tokens[:, :21], source[:, :21])  # 3 rows of 7 latents, bit for bit
    assert (out.tokens[:, 21:] - source[:, 21:]).abs().mean() > 0.1  # the rest is sampled, not copied
    again = pipe.edit(digits, keep, labels, seed=1, output_type="pt")
    assert torch.equal(again.tokens[:, :21], source[:, :21]) and not torch.equal(again.tokens, out.tokens)

    def top_error(images):  # mean |pixel - source| over the top 8 pixel rows (away from the seam at row 12)
        return (images[..., :8, :] - digits[..., :8, :]).abs().mean(dim=(1, 2, 3))

    edited, free = top_error(out.images), top_error(pipe(labels, seed=0, output_type="pt").images)
    # measured: edits 0.023-0.047 (the tokenizer's own reconstruction 0.015-0.027), free samples 0.08-0.20
    assert (edited < 0.06).all(), edited
    assert edited.mean() < 0.5 * free.mean(), (edited, free)


def test_argen_edit_runs_mar(tmp_path, capsys):
    from argen.cli import main

    out = tmp_path / "edit.png"
    argv = ["edit", "--model", "mar", "--digit", "3", "--box", "0,14,28,28", "-n", "2", "--set", "steps=4"]
    assert main([*argv, "--set", "head_steps=5", "--out", str(out)]) == 0
    assert "2 edits" in capsys.readouterr().out and out.is_file()


@pytest.mark.parametrize(
    "name, fast",
    [
        ("raster", {}),
        ("next-scale", {}),
        ("masked", {"steps": 4}),
        ("random-order", {"steps": 8}),
        ("mar", {"steps": 4, "head_steps": 5}),
    ],
)
def test_every_shipped_order_keeps_what_its_tokenizer_encodes(name, fast):
    """The mechanism is one line for all: the tokenizer's encode and token_mask give known tokens in the layout
    the generator samples ((B, L) ids, or (B, L, D) scaled latents), and the decode loop keeps them."""
    pipe = ARPipeline.from_pretrained(name)
    digits = load_dataset("mnist:test", 28).images[5:6]
    keep = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    keep[..., :, :16] = True  # the left part stays
    out = pipe.edit(digits, keep, [4], seed=0, output_type="pt", **fast)
    with torch.no_grad():
        source, known = pipe.tokenizer.encode(digits), pipe.tokenizer.token_mask(keep)
    assert 0 < known.sum() < known.numel()
    assert torch.equal(out.tokens[known], source[known])
    assert not torch.equal(out.tokens[~known], source[~known])
