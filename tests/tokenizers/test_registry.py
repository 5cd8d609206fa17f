import pytest

from argen.errors import ConfigError
from argen.models.registry import presets as generator_presets
from argen.tokenizers.registry import TOKENIZERS, build, presets


def test_every_preset_builds_its_kind_and_declares_its_values():
    table = presets()
    assert {"mnist-small", "mnist-multiscale", "mnist-kl", "llamagen-vq16", "var-vae-256"} <= set(table)
    for name, config in table.items():
        if name not in {"mnist-small", "mnist-multiscale", "mnist-kl"}:
            continue  # the released sizes are too large to build in a unit test
        model = build(config)
        kind = next(k for k, (cls, t) in TOKENIZERS.items() if name in t)
        assert type(model) is TOKENIZERS[kind][0]
        assert model.values == ("continuous" if kind == "kl" else "discrete")


def test_a_foreign_config_is_refused_by_name():
    config = generator_presets()["mnist-small"][1]
    with pytest.raises(ConfigError, match="RasterConfig is not the config of any tokenizer"):
        build(config)
