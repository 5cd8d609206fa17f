import pytest
import torch

from argen.pipeline import ARPipeline
from argen.sampling.decode import SamplerConfig, generate, seeded_generators
from tests.conftest import tiny_raster


def model():
    m = tiny_raster(vocab_size=16, grid_size=4, num_classes=3)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m


@pytest.mark.parametrize("config", [SamplerConfig(), SamplerConfig(cfg_scale=2.0, top_k=5)])
def test_window_equal_to_the_row_width_is_plain_raster_decoding(config):
    m = model()
    labels = torch.tensor([0, 1, 2])
    plain = generate(m, labels, config, seeded_generators([1, 2, 3]))
    parallel = generate(m, labels, config.with_overrides(parallel_window=4), seeded_generators([1, 2, 3]))
    assert torch.equal(plain, parallel)


def test_small_windows_need_fewer_passes_and_fill_every_token():
    from argen.eval.speed import CountingGenerator

    for window, passes in [(1, 4 + 3 * 1), (2, 4 + 3 * 2), (4, 16)]:
        counter = CountingGenerator(model())
        ids = generate(
            counter,
            torch.tensor([0, 1]),
            SamplerConfig.from_flat(dict(parallel_window=window)),
            seeded_generators([0, 1]),
        )
        assert counter.calls == passes and (ids >= 0).all()


def test_shipped_model_stays_recognisable_with_parallel_rows():
    from argen.eval.classifier import accuracy
    from argen.eval.features import DEFAULT_CLASSIFIER
    from argen.pretrained import load_pretrained

    pipe = ARPipeline.from_pretrained("default")
    labels = torch.arange(10).repeat(3)
    out = pipe(labels, seed=0, output_type="pt", parallel_window=2)
    assert accuracy(load_pretrained(DEFAULT_CLASSIFIER), out.images, out.labels) > 0.6
    with pytest.raises(ValueError, match="not both"):
        SamplerConfig.from_flat(dict(parallel_window=2, speculative="sjd"))
