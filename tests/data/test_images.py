import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from argen.data.datasets import FILES_SHOWN_PER_REASON, MAX_TRAINING_PIXELS, MIN_IMAGE_SIDE, ImageFolder, load_dataset
from argen.data.images import ImageError, load_image, read_image
from argen.errors import ConfigError


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
    assert "skipped 3 of 9 files (not an image: 3); 6 images kept" in caplog.text
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


def make_folder(root, sizes_by_class: dict[str, list[tuple[int, int]]], colour=(90, 160, 220)):
    for cls, sizes in sizes_by_class.items():
        (root / cls).mkdir(exist_ok=True)
        for i, size in enumerate(sizes):
            save(Image.new("RGB", size, colour), root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, fmt, orientation):
    stored = np.zeros((16, 32), np.uint8)  # stored 32 wide, 16 tall: a white block at the top-left corner
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: display rotated 90° clockwise; 8: 90° counter-clockwise
    path = save(
        Image.fromarray(stored),
        tmp_path / f"r.{fmt.lower()}",
        fmt,
        exif=exif,
        **({"quality": 95} if fmt == "JPEG" else {}),
    )
    px = load_image(path, channels=1)[..., 0]
    assert px.shape == (32, 16)  # upright: 16 wide, 32 tall
    # Clockwise, the top-left corner goes to the top-right; counter-clockwise, to the bottom-left.
    corner = px[:8, -8:] if orientation == 6 else px[-8:, :8]
    assert corner.mean() > 240 and (px > 128).mean() < 0.2


def test_alpha_content_is_composited_over_the_contrasting_background(tmp_path, caplog):
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 7:9] = 255  # a vertical stroke drawn only in alpha
    (tmp_path / "glyphs").mkdir()
    white = np.dstack([np.full((16, 16, 3), 255, np.uint8), alpha])  # white strokes on transparency
    save(Image.fromarray(white, "RGBA"), tmp_path / "glyphs" / "white.png")
    black = np.dstack([np.zeros((16, 16, 3), np.uint8), alpha])  # black strokes on transparent black
    save(Image.fromarray(black, "RGBA"), tmp_path / "glyphs" / "black.png")
    px = read_image(tmp_path / "glyphs" / "white.png", channels=1)
    assert px.over_black and px.pixels[8, 8, 0] == 255 and px.pixels[0, 0, 0] == 0  # a white stroke on black
    px = read_image(tmp_path / "glyphs" / "black.png", channels=1)
    assert not px.over_black and px.pixels[8, 8, 0] == 0 and px.pixels[0, 0, 0] == 255  # unchanged: over white
    with caplog.at_level(logging.WARNING):
        data = ImageFolder(tmp_path, size=16, channels=1, progress=False)
    assert data.over_black == 1 and len(data) == 2
    assert caplog.text.count("1 images keep their drawing in the alpha channel") == 1


def test_tiny_and_huge_images_are_skipped_from_the_header_and_counted(tmp_path, caplog, monkeypatch):
    make_folder(tmp_path, {"a": [(32, 32), (1, 1), (4, 40)], "b": [(32, 32), (8, 8)]})
    start = time.perf_counter()
    save(Image.new("L", (5000, 5000), 255), tmp_path / "b" / "huge.png")  # 25 M pixels, ~35 KB on disk
    assert time.perf_counter() - start < 1.0
    noise = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)), tmp_path / "n.png")
    (tmp_path / "b" / "cut.png").write_bytes(noise.read_bytes()[:2000])
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or original_load(im))
    with caplog.at_level(logging.WARNING):
        data = ImageFolder(tmp_path, size=32, channels=3, progress=False)
    assert MAX_TRAINING_PIXELS <= Image.MAX_IMAGE_PIXELS // 4 and MIN_IMAGE_SIDE == 8
    assert len(data) == 3 and dict(data.skipped) == {"too_small": 2, "too_large": 1, "truncated": 1}
    assert (5000, 5000) not in decoded and (1, 1) not in decoded  # judged from the header alone
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert summary == [
        f"{tmp_path}: skipped 4 of 7 files (too small, side under 8 px: 2; too large, over 16,777,216 pixels: 1; "
        "truncated: 1); 3 images kept"
    ]
    # The caps are parameters: a lower pixel cap skips more.
    assert len(ImageFolder(tmp_path, size=32, progress=False, max_pixels=32 * 32 - 1)) == 1


def test_per_file_warnings_are_capped_but_all_counted(tmp_path, caplog):
    make_folder(tmp_path, {"a": [(16, 16)] + [(2, 2)] * 10})
    with caplog.at_level(logging.WARNING):
        data = ImageFolder(tmp_path, size=16, progress=False)
    assert data.skipped["too_small"] == 10
    assert (
        caplog.text.count("skipping ") == FILES_SHOWN_PER_REASON
        and "skipped 10 of 11 files (too small, side under 8 px: 10)" in caplog.text
    )


def test_upscaled_images_are_reported_with_their_sizes(tmp_path, caplog):
    make_folder(tmp_path, {"a": [(32, 32), (32, 32), (64, 64)], "b": [(40, 20)]})
    with caplog.at_level(logging.WARNING):
        data = ImageFolder(tmp_path, size=64, progress=False)
    assert len(data) == 4 and data[0][0].shape == (3, 64, 64)
    assert "3 of 4 images are smaller than image_size 64 and are upscaled (2 at 32x32, 1 at 40x20)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ImageFolder(tmp_path, size=20, progress=False)
    assert "upscaled" not in caplog.text


@pytest.mark.parametrize("channels", [2, 0, 4])
def test_bad_channel_count_is_a_config_error_before_any_file_is_read(tmp_path, caplog, monkeypatch, channels):
    make_folder(tmp_path, {"a": [(16, 16)] * 3})
    import argen.data.datasets as datasets

    monkeypatch.setattr(datasets, "read_image", lambda *a, **k: pytest.fail("the folder was scanned"))
    for build in (lambda: load_dataset(str(tmp_path), 16, channels), lambda: ImageFolder(tmp_path, 16, channels)):
        with pytest.raises(
            ConfigError, match=rf"image_channels must be 1 \(grayscale\) or 3 \(RGB\), got {channels}$"
        ):
            build()
    with pytest.raises(ConfigError, match="image_channels"):
        load_image(tmp_path / "a" / "0.png", channels)
    assert "corrupt" not in caplog.text and "skipped" not in caplog.text
