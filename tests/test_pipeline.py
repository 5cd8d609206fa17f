import pytest
import torch

from argen.errors import ConfigError
from argen.eval.classifier import accuracy
from argen.pipeline import ASSETS, ARPipeline
from argen.pretrained import load_pretrained


@pytest.fixture(scope="module")
def pipe():
    return ARPipeline.from_pretrained("default")


@pytest.mark.parametrize("name", ["default", "next-scale"])
def test_shipped_models_make_recognisable_digits(name):
    pipe = ARPipeline.from_pretrained(name)
    labels = torch.arange(10).repeat(5)
    out = pipe(labels, seed=0, output_type="pt")
    assert out.images.shape == (50, 1, 28, 28)
    assert out.images.min() >= -1 and out.images.max() <= 1
    classifier = load_pretrained(ASSETS / "mnist-classifier")
    assert accuracy(classifier, out.images, out.labels) >= 0.8


def test_same_seed_same_image_whatever_the_batch_size(pipe):
    labels = [1, 4, 4, 9, 0]
    one_by_one = pipe(labels, seed=123, batch_size=1, output_type="np")
    together = pipe(labels, seed=123, batch_size=8, output_type="np")
    assert (one_by_one.images == together.images).all()
    assert torch.equal(one_by_one.tokens, together.tokens)
    other = pipe(labels, seed=124, output_type="np")
    assert not (other.images == together.images).all()


def test_pil_output_generators_and_class_names(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    out = pipe(["3", 7], generator=gens)
    assert [im.size for im in out.images] == [(28, 28)] * 2 and out.images[0].mode == "L"
    again = pipe([3, 7], seed=5)
    assert torch.equal(out.tokens, again.tokens)  # seed=5 means seeds 5, 6
    with pytest.raises(ValueError, match="class ids must be in"):
        pipe([10])
    with pytest.raises(ValueError, match="one per image"):
        pipe([1, 2], generator=gens[:1])


def test_pipeline_save_and_reload(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    reloaded = ARPipeline.from_pretrained(tmp_path / "p")
    assert reloaded.sampler == pipe.sampler
    assert torch.equal(reloaded([2, 3], seed=1).tokens, pipe([2, 3], seed=1).tokens)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a shipped model"):
        ARPipeline.from_pretrained("no-such-model")


def test_speculative_decoding_at_a_large_batch_warns_that_it_is_slower(caplog):
    pipe = ARPipeline.from_pretrained("raster")
    with caplog.at_level("WARNING", logger="argen.pipeline"):
        pipe([1, 2], seed=0, speculative="sjd", window=4)
    assert not caplog.records  # 2 images per batch: no warning
    with caplog.at_level("WARNING", logger="argen.pipeline"):
        pipe([1] * 6, seed=0, batch_size=6, speculative="sjd", window=4)
    assert "likely slower than the plain sampler" in caplog.text


def tiny_mar_pipeline() -> ARPipeline:
    """A tiny KL tokenizer (12 x 12 images -> 3 x 3 x 4 latents) and the contract suite's tiny MAR."""
    from argen.tokenizers.kl import KLConfig, KLTokenizer
    from tests.models.test_mar import tiny_mar

    torch.manual_seed(0)
    config = KLConfig(image_size=12, image_channels=1, embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    return ARPipeline(KLTokenizer(config), tiny_mar(), sampler=None)


def test_mar_pipeline_saved_and_loaded_gives_identical_samples(tmp_path):
    pipe = tiny_mar_pipeline()
    settings = dict(steps=3, head_steps=4)
    before = pipe([0, 2, 1], seed=7, output_type="pt", **settings)
    assert before.tokens.shape == (3, 9, 4) and before.images.shape == (3, 1, 12, 12)
    pipe.save_pretrained(tmp_path / "mar")
    reloaded = ARPipeline.from_pretrained(tmp_path / "mar")
    assert reloaded.sampler == pipe.sampler and reloaded.sampler.cfg_schedule == "linear"
    after = reloaded([0, 2, 1], seed=7, output_type="pt", **settings)
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.images, after.images)
    singles = torch.cat(
        [reloaded([c], seed=7 + i, output_type="pt", **settings).tokens for i, c in enumerate([0, 2, 1])]
    )
    assert torch.equal(singles, after.tokens)  # a seed gives the same latents alone or in a batch
    frames = list(reloaded.progressive([1], seed=3, **settings))
    assert len(frames) == 3 and frames[-1].shape == (1, 1, 12, 12)


def test_a_tokenizer_of_the_other_kind_is_refused():
    from tests.conftest import tiny_vq
    from tests.models.test_mar import tiny_mar

    with pytest.raises(ValueError, match="gives discrete tokens, the mar order models continuous"):
        ARPipeline(tiny_vq(image_size=6, codebook_size=8), tiny_mar())


def test_a_compiled_pipeline_samples_what_the_eager_one_does():
    """`compile()` (inductor: a C++ compiler on CPU) compiles each generator block and the decoder in place."""
    import copy

    from tests.conftest import tiny_raster, tiny_vq

    eager = ARPipeline(tiny_vq(image_size=6, codebook_size=32), tiny_raster())
    compiled = copy.deepcopy(eager).compile()
    assert compiled.compiled
    assert all(block._compiled_call_impl is not None for block in compiled.generator.repeated_blocks())
    assert compiled.tokenizer.decoder._compiled_call_impl is not None
    a = eager([0, 1, 2, 1], seed=0, output_type="pt")
    b = compiled([0, 1, 2, 1], seed=0, output_type="pt")
    # fused kernels may sum in another order: logits within rounding, so the same draws here
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.images, b.images, atol=1e-4)


def test_a_guide_model_is_saved_loaded_and_checked(tmp_path):
    raster = ARPipeline.from_pretrained("raster")
    # the raster default's draft model is a weaker raster generator on the same tokens: a guide for autoguidance
    guided = ARPipeline(raster.tokenizer, raster.generator, raster.class_names, raster.sampler, guide=raster.draft)
    guided.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "guide" / "model.safetensors").is_file()
    reloaded = ARPipeline.from_pretrained(tmp_path / "p")
    a = guided([2, 3, 7], seed=1, guide_scale=2.0).tokens
    assert torch.equal(reloaded([2, 3, 7], seed=1, guide_scale=2.0).tokens, a)
    assert not torch.equal(guided([2, 3, 7], seed=1).tokens, a)
    with pytest.raises(ConfigError, match="needs a guide model"):
        raster([1], seed=0, guide_scale=2.0)
    other = ARPipeline.from_pretrained("next-scale")
    with pytest.raises(ConfigError, match="must share the generator's order"):
        ARPipeline(raster.tokenizer, raster.generator, guide=other.generator)
