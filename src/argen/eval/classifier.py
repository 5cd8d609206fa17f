"""A small CNN digit classifier: judges whether generated digits show the requested class, and (later) gives
the offline feature extractor of the evaluation suite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import check_int
from argen.pretrained import Pretrained, register


@dataclass
class ClassifierConfig:
    image_size: int = 28
    image_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self) -> None:
        check_int(self, "image_size", minimum=4)  # two 2x poolings
        for name in ("image_channels", "num_classes", "width", "feature_dim"):
            check_int(self, name)


@register
class ImageClassifier(nn.Module, Pretrained):
    """(N, C, H, W) images in [-1, 1] -> (N, num_classes) logits; `features` gives the (N, feature_dim) layer."""

    component_type = "image_classifier"
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        w = c.width
        self.convs = nn.Sequential(
            nn.Conv2d(c.image_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = c.image_size // 4
        self.fc = nn.Linear(2 * w * side * side, c.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.image_channels:
            raise ValueError(f"images must be (N, {c.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != c.image_size or images.shape[-2] != c.image_size:
            images = F.interpolate(images, size=(c.image_size, c.image_size), mode="bilinear", antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.convs(self._prepare(images)).flatten(1)  # (N, 2w * side * side)
        return F.relu(self.fc(h))  # (N, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


@torch.no_grad()
def predict(classifier: ImageClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N,) predicted classes."""
    classifier.eval()
    device = next(classifier.parameters()).device
    return torch.cat(
        [classifier(images[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(images), batch_size)]
    )


def accuracy(classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(classifier, images) == labels.cpu()).float().mean().item()
