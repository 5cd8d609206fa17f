import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from argen.errors import CheckpointError, ConfigError, NonFiniteCheckpointError, NonFiniteError, StorageError
from argen.models.raster import RasterConfig, RasterTransformer
from argen.pretrained import config_from_dict, load_pretrained, load_state_dict_strict, non_finite
from argen.storage import save_image, save_npz
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


def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path):
    model = tiny_raster()
    name = next(model.named_parameters())[0]
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"refusing to write non-finite weights .*'{name}'"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    tiny_raster().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    tensors["norm.weight"][1] = float("nan")
    save_file(tensors, path)
    with pytest.raises(NonFiniteCheckpointError, match="holds non-finite weights: 'norm.weight' \\(1 of 32"):
        load_pretrained(tmp_path / "m")


def test_a_minus_infinity_attention_mask_buffer_is_not_non_finite():
    mask = {"attn_bias": torch.tensor([0.0, float("-inf")]), "w": torch.ones(2)}
    assert non_finite(mask, parameters=["w"]) == []
    assert non_finite({**mask, "attn_bias": torch.tensor([float("nan")])}, parameters=["w"]) == ["attn_bias"]
    assert non_finite({**mask, "w": torch.tensor([float("-inf")])}, parameters=["w"]) == ["w"]


def test_invalid_config_inside_a_checkpoint_is_a_checkpoint_error(tmp_path):
    tiny_raster().save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["config"]["dimm"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: unknown RasterConfig field"):
        load_pretrained(tmp_path / "m")
    config_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not an argen config"):
        load_pretrained(tmp_path / "m")


def test_a_full_disk_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    model = tiny_raster()
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("argen.pretrained.save_file", full)
    with pytest.raises(StorageError, match=r"^no space left on device while writing \S+/m/model.safetensors$"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_image_and_npz_writes_are_atomic(tmp_path, monkeypatch):
    image = Image.new("L", (4, 4))
    save_image(image, tmp_path / "a.png")
    save_npz(tmp_path / "a.npz", images=np.zeros((1, 2, 2, 1), np.uint8))
    assert Image.open(tmp_path / "a.png").size == (4, 4) and np.load(tmp_path / "a.npz")["images"].shape[0] == 1

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")  # what a full disk leaves: an empty file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(StorageError, match="no space left on device while writing"):
        save_image(image, tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.png"]
    with pytest.raises(ConfigError, match="unknown extension '.txt'"):
        save_image(image, tmp_path / "c.txt")
