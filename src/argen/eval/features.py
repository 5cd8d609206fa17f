"""Feature extractors for the sample-quality metrics: nn.Modules mapping uint8 images (N, C, H, W) to (N, D)
features, the interface torchmetrics' `feature=` argument expects.

The offline default is the small classifier argen ships (its penultimate layer). Standard Inception features
come from torch-fidelity / torchmetrics (optional extra `argen[inception]`) when the user has the
`pt_inception-2015-12-05` weights or internet access; argen does not re-implement Inception.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from argen.eval.classifier import ImageClassifier

INCEPTION_ENV = "ARGEN_INCEPTION_WEIGHTS"
DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "assets" / "mnist-classifier"


def uint8_to_unit(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] with `channels` channels (RGB -> luma when 1 is wanted)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0
    if x.shape[1] == 3 and channels == 1:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x


class ClassifierFeatures(nn.Module):
    """Penultimate features (and class probabilities) of an argen ImageClassifier."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config.feature_dim

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = uint8_to_unit(images, self.classifier.config.image_channels)
        size = self.classifier.config.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x.to(next(self.classifier.parameters()).device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._prepare(images))

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._prepare(images)).softmax(-1)


def inception_features(weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's InceptionV3 2048-d pool features, from a local weights file or the user's internet.

    Raises RuntimeError with the reason when neither the package nor the weights are available.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise RuntimeError("Inception FID/IS needs the optional extra: pip install 'argen[inception]'") from e
    weights = weights or os.environ.get(INCEPTION_ENV)
    if weights is not None and not Path(weights).is_file():
        raise RuntimeError(f"Inception weights {weights} not found")
    kwargs = {"feature_extractor_weights_path": str(weights)} if weights else {}
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], **kwargs)

    class _Pool(nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = extractor.eval()

        @torch.no_grad()
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
            return self.net(x)[0].reshape(len(x), -1)

    return _Pool()
