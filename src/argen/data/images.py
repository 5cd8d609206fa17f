"""Reading one image file safely and converting it to 8-bit L or RGB pixels of a given size.

Every failure becomes an `ImageError` with a `kind` (so a dataset can count them): Pillow's lazy
decoding is forced with `load()` so a truncated file fails here instead of giving grey pixels later.
Pillow's decompression-bomb guard is left on.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageError(ValueError):
    def __init__(self, path: str | os.PathLike, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.kind = kind


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


def _composite(img: Image.Image, background: int = 255) -> Image.Image:
    """Images with transparency are composited over a white background rather than losing alpha."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGBA", img.size, (background, background, background, 255))
        return Image.alpha_composite(base, img).convert("RGB")
    return img


def convert(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 'L' (channels=1) or 'RGB' (channels=3)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _composite(_to_8bit(img))
    return img.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, 1-bit: Pillow's own conversions


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)


def load_image(path: str | os.PathLike, channels: int, size: int | None = None) -> np.ndarray:
    """Read, fully decode, convert and (optionally) center-crop/resize. Returns (H, W, C) uint8."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would load as grey; unset it")
    try:
        with Image.open(path) as img:
            img.load()
            img = convert(img, channels)
    except Image.DecompressionBombError as e:
        raise ImageError(path, "decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError(path, "not_an_image", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        kind = "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "corrupt"
        raise ImageError(path, kind, str(e)) from e
    if size is not None:
        img = center_crop_resize(img, size)
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


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
