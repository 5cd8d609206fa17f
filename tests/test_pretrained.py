import json

import pytest
import torch

from argen.models.raster import RasterConfig, RasterTransformer
from argen.pretrained import config_from_dict, load_pretrained, load_state_dict_strict
from tests.conftest import tiny_raster, tiny_vq


def test_round_trip_gives_identical_logits(tmp_path):
    model = tiny_raster()
    model.save_pretrained(tmp_path / "m")
    loaded = RasterTransformer.from_pretrained(tmp_path / "m")
    ids, labels = torch.randint(0, 16, (2, 3)), torch.tensor([0, 2])
    assert torch.equal(model(ids, labels), loaded(ids, labels))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["component_type"] == "raster_transformer" and config["config"]["dim"] == 32


def test_tokenizer_round_trip(tmp_path):
    tok = tiny_vq(image_size=8, codebook_size=8).eval()
    tok.save_pretrained(tmp_path / "t")
    loaded = load_pretrained(tmp_path / "t")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(tok.encode(x), loaded.encode(x))
    with pytest.raises(TypeError, match="not a"):
        RasterTransformer.from_pretrained(tmp_path / "t")


def test_strict_loading_lists_missing_unexpected_and_shapes():
    model = tiny_raster()
    state = dict(model.state_dict())
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    state["output.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        load_state_dict_strict(model, state)
    msg = str(e.value)
    assert "missing keys (1): ['norm.weight']" in msg and "extra.weight" in msg and "shape of output.weight" in msg


def test_corrupt_and_truncated_weights_are_clear_errors(tmp_path):
    tiny_raster().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_pretrained(tmp_path / "m")
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_pretrained(tmp_path / "m")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown RasterConfig field"):
        config_from_dict(RasterConfig, {"dimm": 3})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"format_version": 1, "component_type": "nope"}))
    with pytest.raises(ValueError, match="component_type 'nope' is unknown"):
        load_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing")
