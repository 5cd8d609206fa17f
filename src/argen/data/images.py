"""Reading one image file safely and converting it to 8-bit L or RGB pixels of a given size.

Every failure becomes an `ImageError` with a `kind` (so a dataset can count them): Pillow's lazy
decoding is forced with `load()` so a truncated file fails here instead of giving grey pixels later.
Pillow's decompression-bomb guard is left on; a caller can ask for a much lower pixel cap and a minimum side,
both checked from the header before any pixel is decoded. The EXIF orientation is applied, so a photo taken
sideways is read upright.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from argen.errors import ArgenError, ConfigError, DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CHANNELS = (1, 3)  # 'L' or 'RGB'
# A composite spanning fewer grey levels than this (of 255, in every channel) shows nothing.
BLANK_CONTRAST = 16


class ImageError(DataError):
    """One file a dataset cannot use; `kind` names the reason so a dataset can count files per reason."""

    def __init__(self, path: str | os.PathLike, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.kind, self.detail = kind, detail


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images: rescale to 0..255 instead of clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if a.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def check_channels(channels: int) -> None:
    """The one place the channel count is checked: a bad value is the config's fault, never the data's."""
    if channels not in CHANNELS:
        raise ConfigError(f"image_channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _contrast(rgb: Image.Image) -> int:
    """Largest range of any channel, in grey levels (0..255)."""
    return int(np.ptp(np.asarray(rgb).reshape(-1, 3), axis=0).max())


def _over(img: Image.Image, background: int) -> Image.Image:
    base = Image.new("RGBA", img.size, (background, background, background, 255))
    return Image.alpha_composite(base, img).convert("RGB")


def _composite(img: Image.Image) -> tuple[Image.Image, bool]:
    """Images with transparency are composited over a background rather than losing alpha.

    White is the background unless it hides everything while black does not: an image whose colour is one
    (light) colour and whose drawing lives in the alpha channel (white strokes on transparency, a common icon
    and glyph format) is composited over black instead. Returns (image, whether black was chosen).
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return img, False
    over_white = _over(img, 255)
    if _contrast(over_white) >= BLANK_CONTRAST:
        return over_white, False
    over_black = _over(img, 0)
    if _contrast(over_black) >= BLANK_CONTRAST:
        return over_black, True
    return over_white, False


def convert(img: Image.Image, channels: int) -> tuple[Image.Image, bool]:
    """Any Pillow mode -> 'L' (channels=1) or 'RGB' (channels=3), and whether it was composited over black."""
    check_channels(channels)
    img, over_black = _composite(_to_8bit(img))
    return img.convert("L" if channels == 1 else "RGB"), over_black  # CMYK, YCbCr, 1-bit: Pillow's conversions


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (H, W, C) uint8, after any resize
    source_size: tuple[int, int]  # (width, height) as stored, after the EXIF orientation
    over_black: bool  # content lived in the alpha channel, so it was composited over black, not white


def read_image(
    path: str | os.PathLike,
    channels: int,
    size: int | None = None,
    min_side: int | None = None,
    max_pixels: int | None = None,
) -> LoadedImage:
    """Read, fully decode, orient (EXIF), convert and (optionally) center-crop/resize.

    `min_side` and `max_pixels` are checked from the header, before decoding: a smaller or larger image raises
    an `ImageError` of kind "too_small" / "too_large".
    """
    check_channels(channels)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would load as grey; unset it")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own, lower cap reports it; Pillow's warning would only repeat it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if min_side is not None and min(w, h) < min_side:
                raise ImageError(path, "too_small", f"{w}x{h} has a side under {min_side} px")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(path, "too_large", f"{w}x{h} = {w * h:,} pixels is over the cap of {max_pixels:,}")
            img.load()
            img = ImageOps.exif_transpose(img)
            source_size = img.size
            img, over_black = convert(img, channels)
    except Image.DecompressionBombError as e:
        raise ImageError(path, "decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError(path, "not_an_image", str(e)) from e
    except ArgenError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        kind = "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "corrupt"
        raise ImageError(path, kind, str(e)) from e
    if size is not None:
        img = center_crop_resize(img, size)
    a = np.asarray(img, dtype=np.uint8)
    return LoadedImage(a[..., None] if a.ndim == 2 else a, source_size, over_black)


def load_image(path: str | os.PathLike, channels: int, size: int | None = None) -> np.ndarray:
    """`read_image`'s pixels: (H, W, C) uint8."""
    return read_image(path, channels, size).pixels


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (N, H, W, C) uint8 -> (C, H, W) / (N, C, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.array(pixels, copy=True)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (mode L for 1 channel, RGB for 3)."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images)]


def grid(images: torch.Tensor, rows: int, pad: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image with `rows` rows (column-major fill left to right)."""
    a = to_uint8(images)
    N, H, W, C = a.shape
    cols = -(-N // rows)
    canvas = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        canvas[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = a[i]
    return Image.fromarray(canvas[..., 0] if C == 1 else canvas)
