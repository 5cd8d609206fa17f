import pytest
import torch

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
