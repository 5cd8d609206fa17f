"""`argen eval`: judge a pipeline and sampler setting on a fixed protocol.

Protocol: N class-balanced samples per seed; features from a pluggable extractor; Fréchet distance, KID,
precision/recall (k=3) against a fixed held-out reference set of the same N; the real-vs-real floor (N
training-split images against the same reference) beside every FD; class accuracy and the classifier score
under the offline classifier; test-set NLL in bits per token of the generator on the reference images.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from argen.data.datasets import BUILTIN, ArrayDataset, load_dataset, split_indices
from argen.data.images import to_uint8
from argen.eval.features import ClassifierFeatures
from argen.eval.likelihood import bits_per_token
from argen.eval.metrics import classifier_score, frechet_distance, kernel_inception_distance, precision_recall
from argen.pipeline import ARPipeline


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
    extra: dict = field(default_factory=dict)

    @property
    def fd_multiple(self) -> float:
        """FD as a multiple of the real-vs-real floor at the same N: 1.0 is as close as real images get."""
        return self.fd.mean / self.fd_real_floor

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


@torch.no_grad()
def features_of(extractor: nn.Module, images_uint8: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    return torch.cat([extractor(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def sample_uint8(pipe: ARPipeline, n: int, seed: int, batch_size: int, **sampler) -> tuple[np.ndarray, torch.Tensor]:
    labels = torch.arange(n) % pipe.generator.num_classes
    out = pipe(labels, seed=seed * 1_000_003, batch_size=batch_size, output_type="np", **sampler)
    return out.images, out.labels


def evaluate(
    pipe: ARPipeline,
    reference: ArrayDataset,
    train_split: ArrayDataset,
    extractor: nn.Module,
    seeds: list[int],
    classifier: ClassifierFeatures | None = None,
    batch_size: int = 100,
    **sampler,
) -> EvalReport:
    n = len(reference)
    ref_u8 = to_uint8(reference.images)
    ref_feat = features_of(extractor, ref_u8)
    g = torch.Generator().manual_seed(12345)
    floor_idx = torch.randperm(len(train_split), generator=g)[:n]
    floor = frechet_distance(features_of(extractor, to_uint8(train_split.images[floor_idx])), ref_feat)
    fds, kids, precs, recs, accs, scores = [], [], [], [], [], []
    for seed in seeds:
        images, labels = sample_uint8(pipe, n, seed, batch_size, **sampler)
        feat = features_of(extractor, images)
        fds.append(frechet_distance(ref_feat, feat))
        kids.append(kernel_inception_distance(ref_feat, feat, num_subsets=50, subset_size=min(n, 1000)).mean)
        pr = precision_recall(ref_feat, feat)
        precs.append(pr.precision)
        recs.append(pr.recall)
        if classifier is not None:
            probs = torch.cat(
                [classifier.probs(torch.from_numpy(images[i : i + 500]).permute(0, 3, 1, 2)) for i in range(0, n, 500)]
            )
            accs.append((probs.argmax(1).cpu() == labels).double().mean().item())
            scores.append(classifier_score(probs))
    with torch.no_grad():
        ids = torch.cat(
            [pipe.tokenizer.encode(reference.images[i : i + 250].to(pipe.device)).cpu() for i in range(0, n, 250)]
        )
    bits = bits_per_token(pipe.generator, TensorDataset(ids, reference.labels))
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
        bits_per_token=bits,
        feature_extractor=type(extractor).__name__,
    )
