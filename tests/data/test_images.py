import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from argen.data.datasets import ImageFolder, load_dataset
from argen.data.images import ImageError, load_image


def save(img: Image.Image, path, fmt="PNG", **kw):
    img.save(path, format=fmt, **kw)
    return path


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:2, ..., 3] = 255  # ... opaque on the top half, fully transparent below
    px = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), channels=3)
    assert px[0, 0].tolist() == [255, 0, 0]
    assert px[3, 3].tolist() == [255, 255, 255]  # not the hidden black-ish colour


def test_palette_with_transparency_and_cmyk(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = 0
    px = load_image(save(p, tmp_path / "p.png", transparency=0), channels=3)
    assert px[0, 0].tolist() == [0, 0, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    px = load_image(save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100), channels=3)
    assert px[0, 0, 0] > 240 and px[0, 0, 1] < 20 and px[0, 0, 2] < 20


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    a = np.array([[0, 32768], [65535, 1000]], np.uint16)
    px = load_image(save(Image.fromarray(a), tmp_path / "g16.png"), channels=1)
    assert px[..., 0].tolist() == [[0, 128], [255, 4]]


def test_truncated_corrupt_and_non_images_raise_by_kind(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "n.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, "JPEG")
    (tmp_path / "j.jpg").write_bytes(buf.getvalue()[:200])
    kinds = {}
    for name in ("t.png", "n.png", "j.jpg"):
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name, channels=3)
        kinds[name] = e.value.kind
    assert kinds["n.png"] == "not_an_image"
    assert kinds["t.png"] in ("truncated", "corrupt") and kinds["j.jpg"] in ("truncated", "corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = save(Image.new("L", (300, 300)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300x300 is > 2x the limit: an error
    with pytest.raises(ImageError) as e:
        load_image(path, channels=1)
    assert e.value.kind == "decompression_bomb"


def test_image_folder_skips_and_counts_bad_files(tmp_path, caplog):
    for cls, colour in (("cats", 50), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            save(Image.new("RGB", (40, 30), (colour, colour, colour)), tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "dogs" / "notes.txt").write_text("hello")
    (tmp_path / "cats" / "fake.jpg").write_bytes(b"definitely not a jpeg")
    with caplog.at_level(logging.WARNING):
        data = ImageFolder(tmp_path, size=16, channels=3, progress=False)
    assert data.class_names == ["cats", "dogs"]
    assert len(data) == 6
    assert sum(data.skipped.values()) == 3 and data.skipped["not_an_image"] >= 2
    assert "skipped 3 files" in caplog.text
    image, label = data[4]
    assert image.shape == (3, 16, 16) and label.item() == 1
    assert abs(image.mean().item() - (200 / 127.5 - 1)) < 0.02


def test_mnist_builtin_is_real_digits():
    data = load_dataset("mnist", 28)
    assert len(data) == 5000 and data.images.shape == (5000, 1, 28, 28)
    assert sorted(np.bincount(data.labels.numpy()).tolist()) == [500] * 10
    assert data.images.min() == -1 and data.images.max() == 1
    # Digits are bright strokes on a dark background: most pixels are background.
    assert (data.images < -0.9).float().mean() > 0.7
    train, test = load_dataset("mnist:train", 28), load_dataset("mnist:test", 28)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.labels).tolist() == [100] * 10
    both = torch.cat([train.images, test.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(data.images.flatten(1), dim=0).shape[0]


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a built-in"):
        load_dataset("imagenet-please", 28)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("mnist:val", 28)


def test_fashion_mnist_reads_idx_files_and_explains_when_missing(tmp_path, monkeypatch):
    import gzip
    import struct

    import argen.data.datasets as datasets

    pixels = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    for prefix, n in (("train", 3), ("t10k", 3)):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + pixels.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes([7, 1, 9]))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    data = load_dataset("fashion-mnist:test", 28)
    assert data.labels.tolist() == [7, 1, 9] and data.class_names[7] == "sneaker"
    assert torch.equal(data.images[1, 0], torch.from_numpy(pixels[1]).float() / 127.5 - 1)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", 28)
