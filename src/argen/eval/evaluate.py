"""`argen eval`: judge a pipeline and sampler setting on a fixed protocol.

Protocol: N class-balanced samples per seed; features from a pluggable extractor; Fréchet distance, KID,
precision/recall (k=3) against a fixed held-out reference set of the same N; the real-vs-real floor (N
training-split images against the same reference) beside every FD; class accuracy and the classifier score
under the offline classifier; the share of samples that are near-copies of a training-split image (nearest
neighbour in the same features); test-set NLL in bits per token of the generator on the reference images.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from argen.data.datasets import BUILTIN, ArrayDataset, load_dataset, split_indices
from argen.data.images import to_uint8
from argen.eval.features import ClassifierFeatures
from argen.eval.likelihood import likelihood
from argen.eval.metrics import (
    NEAR_COPY_QUANTILE,
    NearCopyCheck,
    classifier_score,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from argen.pipeline import ARPipeline
from argen.train.distributed import DistInfo, gather_in_order, rank_batches, run_on_main

T = TypeVar("T")


@dataclass
class MeanStd:
    mean: float
    std: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> MeanStd:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.std:.2g}"


# The bar every shipped model meets (docs/quality.md): at N = 1000, mean over seeds.
BAR_ACCURACY = 0.97
BAR_FD_MULTIPLE = 1.5
# Flagged beside the bar, not part of it: the shipped models sit at 5.0-5.9 % near-copies (N = 1000), a tokenizer's
# reconstructions of training images at 77-87 % (docs/quality.md), so a model copying a seventh of its samples
# through its tokenizer would already read about 15 %
MEMORISING_SHARE = 0.15


@dataclass
class EvalReport:
    num_samples: int
    seeds: list[int]
    sampler: dict
    fd: MeanStd
    fd_real_floor: float
    kid: MeanStd
    precision: MeanStd
    recall: MeanStd
    class_accuracy: MeanStd | None
    classifier_score: MeanStd | None
    bits_per_token: float | None  # None: the order defines no likelihood
    feature_extractor: str
    # A multi-scale tokenizer's generator: (pn, held-out bits/token of that map). A map the generator memorised
    # shows here as bits near log2(V) held out (next-scale's finest map: docs/quality.md)
    bits_per_scale: list[tuple[int, float]] | None = None
    # Share of samples nearer a training image than 95 % of held-out real images are (5 % for unseen real images):
    # what FD against a floor of training images cannot see, a model that copies them
    near_copies: MeanStd | None = None
    extra: dict = field(default_factory=dict)

    @property
    def fd_multiple(self) -> float:
        """FD as a multiple of the real-vs-real floor at the same N: 1.0 is as close as real images get."""
        return self.fd.mean / self.fd_real_floor

    @property
    def memorising(self) -> bool:
        """Flagged beside the bar: more near-copies of training images than MEMORISING_SHARE."""
        return self.near_copies is not None and self.near_copies.mean > MEMORISING_SHARE

    def below_bar(self) -> list[str]:
        """Why the model misses the quality bar (accuracy and FD multiple); empty when it meets it."""
        misses = []
        if self.class_accuracy is not None and self.class_accuracy.mean < BAR_ACCURACY:
            misses.append(f"class accuracy {self.class_accuracy.mean:.1%} < {BAR_ACCURACY:.0%}")
        if self.fd_multiple > BAR_FD_MULTIPLE:
            misses.append(f"FD {self.fd_multiple:.2f}x the real floor > {BAR_FD_MULTIPLE}x")
        return misses

    def rows(self) -> list[tuple[str, str]]:
        misses = self.below_bar()
        bar = "met" if not misses else "BELOW: " + "; ".join(misses)
        rows = [
            (f"FD (N={self.num_samples}, {self.feature_extractor})", f"{self.fd} ({self.fd_multiple:.2f}x floor)"),
            ("FD real-vs-real floor (same N)", f"{self.fd_real_floor:.4g}"),
            ("KID", str(self.kid)),
            ("precision (k=3)", str(self.precision)),
            ("recall (k=3)", str(self.recall)),
        ]
        if self.class_accuracy is not None:
            rows.append(("class accuracy", str(self.class_accuracy)))
            rows.append(("classifier score exp(E KL)", str(self.classifier_score)))
        nll = "not defined for this order" if self.bits_per_token is None else f"{self.bits_per_token:.4f}"
        rows.append(("test NLL (bits/token)", nll))
        if self.near_copies is not None:
            copying = " MEMORISING" if self.memorising else ""
            rows.append(
                (
                    "near-copies of training images",
                    f"{self.near_copies.mean:.1%} ± {self.near_copies.std:.1%} "
                    f"(unseen real images: {NEAR_COPY_QUANTILE:.0%}){copying}",
                )
            )
        if self.bits_per_scale:
            per_scale = ", ".join(f"{pn}x{pn}: {bits:.2f}" for pn, bits in self.bits_per_scale)
            rows.append(("test NLL per scale (bits/token)", per_scale))
        rows.append((f"quality bar (accuracy >= {BAR_ACCURACY:.0%}, FD <= {BAR_FD_MULTIPLE}x floor)", bar))
        return rows


def reference_split(dataset: ArrayDataset, n: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Fixed class-balanced reference set of n images, and the rest (the 'training split')."""
    classes = len(dataset.class_names)
    if n % classes:
        raise ValueError(f"N={n} must be a multiple of the {classes} classes (class-balanced sets)")
    per_class = torch.bincount(dataset.labels, minlength=classes).min().item()
    if n // classes > per_class:
        raise ValueError(f"N={n} needs {n // classes} images per class; the data has only {per_class} for one class")
    rest, ref = split_indices(dataset.labels, n // classes, seed=seed)
    return dataset.subset(ref), dataset.subset(rest)


def reference_sets(data: str, n: int, size: int, channels: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(n held-out reference images, training-split images for the real floor).

    Built-in datasets use their test split as the reference pool and their train split for the floor, so a
    model trained on `NAME:train` is judged on images it never saw; an image folder is split here.
    """
    name = data.split(":")[0]
    if name in BUILTIN:
        test = ArrayDataset.of(load_dataset(f"{name}:test", size, channels))
        train = ArrayDataset.of(load_dataset(f"{name}:train", size, channels))
        return reference_split(test, n)[0], train
    return reference_split(ArrayDataset.of(load_dataset(data, size, channels)), n)


def floor_images(train_split: ArrayDataset, n: int) -> torch.Tensor:
    """The n training-split images (a fixed draw) that the real-data floor compares with the reference set."""
    g = torch.Generator().manual_seed(12345)
    return train_split.images[torch.randperm(len(train_split), generator=g)[:n]]


@torch.no_grad()
def reconstruction_fd(
    tokenizer: nn.Module,
    reference: ArrayDataset,
    train_split: ArrayDataset,
    extractor: nn.Module,
    batch_size: int = 250,
) -> tuple[float, float]:
    """(FD of the tokenizer's reconstructions of the floor's training-split images against the reference, the
    floor): the anchor a generator on this tokenizer can at best reach, on the same protocol as `evaluate`."""
    n = len(reference)
    real = floor_images(train_split, n)
    device = next(tokenizer.parameters()).device
    recon = torch.cat(
        [
            tokenizer.decode(tokenizer.encode(real[i : i + batch_size].to(device))).clamp(-1, 1).float().cpu()
            for i in range(0, n, batch_size)
        ]
    )
    ref_feat = features_of(extractor, to_uint8(reference.images))
    floor = frechet_distance(features_of(extractor, to_uint8(real)), ref_feat)
    return frechet_distance(features_of(extractor, to_uint8(recon)), ref_feat), floor


@torch.no_grad()
def features_of(extractor: nn.Module, images_uint8: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    return torch.cat([extractor(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def sample_batches(
    pipe: ARPipeline,
    n: int,
    seed: int,
    batch_size: int,
    each: Callable[[np.ndarray, torch.Tensor], T],
    dist_info: DistInfo | None = None,
    **sampler,
) -> list[T] | None:
    """The n class-balanced samples of `seed`, each batch of (B, H, W, C) uint8 images and (B,) labels mapped
    through `each`; the results in batch order.

    Image i always has seed `seed * 1_000_003 + i` and the batches are those of one process, so under torchrun
    (`dist_info`), where every rank computes its share of the batches, rank 0 gathers exactly the single-process
    results; the other ranks get None.
    """
    info = dist_info or DistInfo()
    labels = torch.arange(n) % pipe.generator.num_classes
    done = []
    for batch in rank_batches(range(n), batch_size, info):
        part = labels[batch.start : batch.stop]
        out = pipe(part, seed=seed * 1_000_003 + batch.start, batch_size=batch_size, output_type="np", **sampler)
        done.append(each(out.images, out.labels))
    return gather_in_order(done, info)


def sample_uint8(
    pipe: ARPipeline, n: int, seed: int, batch_size: int, dist_info: DistInfo | None = None, **sampler
) -> tuple[np.ndarray, torch.Tensor] | None:
    """(N, H, W, C) uint8 images and (N,) labels of `sample_batches` (None on ranks other than 0)."""
    parts = sample_batches(pipe, n, seed, batch_size, lambda images, labels: (images, labels), dist_info, **sampler)
    if parts is None:
        return None
    return np.concatenate([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


@dataclass
class Judged:
    """What the metrics read of one seed's samples."""

    features: torch.Tensor  # (N, D) from the feature extractor
    probs: torch.Tensor | None  # (N, K) class probabilities from the classifier, if any
    labels: torch.Tensor  # (N,) the classes asked for


@torch.no_grad()
def judge_samples(
    pipe: ARPipeline,
    n: int,
    seed: int,
    extractor: nn.Module,
    classifier: ClassifierFeatures | None,
    batch_size: int,
    dist_info: DistInfo | None = None,
    **sampler,
) -> Judged | None:
    """Features (and class probabilities) of `seed`'s samples, computed batch by batch where they are sampled:
    the images never travel between ranks, only their features. None on ranks other than 0."""

    def judge(images: np.ndarray, labels: torch.Tensor):
        probs = None if classifier is None else classifier.probs(torch.from_numpy(images).permute(0, 3, 1, 2))
        return features_of(extractor, images), None if probs is None else probs.cpu(), labels

    parts = sample_batches(pipe, n, seed, batch_size, judge, dist_info, **sampler)
    if parts is None:
        return None
    features, probs, labels = zip(*parts, strict=True)
    return Judged(torch.cat(features), None if classifier is None else torch.cat(probs), torch.cat(labels))


def evaluate(
    pipe: ARPipeline,
    reference: ArrayDataset | None,
    train_split: ArrayDataset | None,
    extractor: nn.Module,
    seeds: list[int],
    classifier: ClassifierFeatures | None = None,
    batch_size: int = 100,
    dist_info: DistInfo | None = None,
    **sampler,
) -> EvalReport | None:
    """The report for `pipe` with `sampler` against `reference` (N images) and the floor from `train_split`.

    `train_split` also stands for the generator's training set in the near-copy check: for a built-in dataset it is
    its train split; for an image folder it is the folder less the reference, which a generator trained on the
    whole folder has seen too, so copies of reference images go unnoticed there, as they do in FD.

    Under torchrun every rank calls it with `dist_info`: the sampling is split across ranks by batch (the same
    images as one process), and rank 0 alone reads `reference` and `train_split` (the others may pass None),
    computes the metrics and returns the report, equal to the single-process one; the other ranks return None.
    """
    info = dist_info or DistInfo()
    n = run_on_main(lambda: len(reference))
    judged = [judge_samples(pipe, n, seed, extractor, classifier, batch_size, info, **sampler) for seed in seeds]
    if not info.is_main:
        return None
    ref_feat = features_of(extractor, to_uint8(reference.images))
    floor = frechet_distance(features_of(extractor, to_uint8(floor_images(train_split, n))), ref_feat)
    copy_check = NearCopyCheck.fit(features_of(extractor, to_uint8(train_split.images)), ref_feat)
    fds, kids, precs, recs, accs, scores, copies = [], [], [], [], [], [], []
    for samples in judged:
        feat = samples.features
        fds.append(frechet_distance(ref_feat, feat))
        kids.append(kernel_inception_distance(ref_feat, feat, num_subsets=50, subset_size=min(n, 1000)).mean)
        pr = precision_recall(ref_feat, feat)
        precs.append(pr.precision)
        recs.append(pr.recall)
        copies.append(copy_check.share(feat))
        if samples.probs is not None:
            accs.append((samples.probs.argmax(1) == samples.labels).double().mean().item())
            scores.append(classifier_score(samples.probs))
    with torch.no_grad():
        ids = torch.cat(
            [pipe.tokenizer.encode(reference.images[i : i + 250].to(pipe.device)).cpu() for i in range(0, n, 250)]
        )
    nll = likelihood(pipe.generator, TensorDataset(ids, reference.labels))
    bits_per_scale = None
    scales = getattr(pipe.tokenizer, "scales", None)  # a multi-scale tokenizer: its maps, scale by scale
    if nll is not None and scales:
        maps = pipe.tokenizer.split(nll.bits_per_position[None])
        bits_per_scale = [(pn, m.mean().item()) for pn, m in zip(scales, maps, strict=True)]
    effective = pipe.config(**sampler).flat()
    return EvalReport(
        num_samples=n,
        seeds=list(seeds),
        sampler=effective,
        fd=MeanStd.of(fds),
        fd_real_floor=floor,
        kid=MeanStd.of(kids),
        precision=MeanStd.of(precs),
        recall=MeanStd.of(recs),
        class_accuracy=MeanStd.of(accs) if accs else None,
        classifier_score=MeanStd.of(scores) if scores else None,
        bits_per_token=None if nll is None else nll.bits_per_token,
        feature_extractor=type(extractor).__name__,
        bits_per_scale=bits_per_scale,
        near_copies=MeanStd.of(copies),
    )
