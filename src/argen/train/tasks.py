"""What the loop trains against: a tokenizer on images, or a generator on pre-tokenized sequences."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from argen.data.images import grid
from argen.models.interface import Condition, Generator, LossOutput
from argen.sampling.config import SamplerConfig
from argen.sampling.decode import generate, seeded_generators
from argen.tokenizers.vq import VQTokenizer
from argen.train.distributed import DistInfo


class TokenizerTask:
    """Reconstruction + codebook + commitment loss; every so often the quantiser restarts its dead codes from the
    batch's latent map (onto its vectors, or a multi-scale quantiser onto the residuals its scales round)."""

    unit = "images"

    def __init__(self, model: VQTokenizer, preview_images: torch.Tensor | None = None, restart_every: int = 100):
        self.model = model
        self.preview_images = preview_images
        self.restart_every = restart_every
        self.restarted = 0

    def loss(self, module: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        images = batch[0]
        return module(images).loss, images.shape[0]

    def train_module(self, model: nn.Module) -> nn.Module:
        return model

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def after_step(self, step: int, batch: list[torch.Tensor], info: DistInfo) -> None:
        if not self.restart_every or (step + 1) % self.restart_every:
            return
        quantizer = self.model.quantize
        if info.is_main:
            self.restarted += quantizer.restart_dead_codes(self.model.latent(batch[0]))
        if info.world_size > 1:
            # The usage window lives on rank 0 (DDP broadcasts buffers from it); so does the restart.
            dist.broadcast(quantizer.embedding.weight.data, src=0)

    def preview(self) -> Image.Image | None:
        if self.preview_images is None:
            return None
        x = self.preview_images.to(next(self.model.parameters()).device)
        recon = self.model.decode(self.model.encode(x)).clamp(-1, 1)
        return grid(torch.cat([x, recon]), rows=2)

    def state_dict(self) -> dict[str, Any]:
        return {"recorded": self.model.quantize.recorded, "restarted": self.restarted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.quantize.recorded = state["recorded"]
        self.restarted = state["restarted"]


class AutoencoderTask(TokenizerTask):
    """A KL tokenizer (`tokenizers/kl.py`): reconstruction + kl_weight * KL, its forward's loss; no codebook, so
    nothing to restart or record."""

    def __init__(self, model: nn.Module, preview_images: torch.Tensor | None = None):
        super().__init__(model, preview_images, restart_every=0)

    def after_step(self, step: int, batch: list[torch.Tensor], info: DistInfo) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OrderLoss(nn.Module):
    """The order's training loss as a module's forward, so that DDP/FSDP wrappers (which synchronise gradients in
    their forward) wrap the loss the order defines rather than the bare network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        return self.model.loss(tokens, condition)


class GeneratorTask:
    """Teacher-forced cross-entropy for any generation order; previews sample one row per class and decode it."""

    unit = "tokens"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: nn.Module | None = None,
        preview_classes: int = 10,
        preview_config: SamplerConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer  # decodes previews; moved with the model (`to`)
        self.preview_classes = preview_classes
        self.preview_config = preview_config or SamplerConfig.from_flat(dict(model.order.default_sampler))

    def loss(self, module: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        tokens, labels = batch
        out = module(tokens, Condition.classes(labels))  # the order owns what it trains against
        return out.loss, out.num_targets

    def train_module(self, model: nn.Module) -> nn.Module:
        return OrderLoss(model)

    def to(self, device: torch.device) -> None:
        """The generator and the tokenizer its previews decode through (a bound one moves with the generator)."""
        self.model.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)

    def after_step(self, step: int, batch: list[torch.Tensor], info: DistInfo) -> None:
        pass

    def preview(self) -> Image.Image | None:
        if self.tokenizer is None:
            return None
        model: Generator = self.model
        n = min(self.preview_classes, model.num_classes)
        device = next(self.model.parameters()).device
        labels = torch.arange(n, device=device).repeat_interleave(4)
        generators = seeded_generators(list(range(len(labels))), device=device)
        ids = generate(model, Condition.classes(labels), self.preview_config, generators)
        return grid(self.tokenizer.decode(ids).clamp(-1, 1).float().cpu(), rows=n)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ClassifierTask:
    """Cross-entropy on labelled images, with small random shifts so the classifier tolerates imperfect digits."""

    unit = "images"

    def __init__(self, model: nn.Module, max_shift: int = 2):
        self.model = model
        self.max_shift = max_shift

    def loss(self, module: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, labels = batch
        if self.max_shift:
            s = self.max_shift
            padded = F.pad(images, (s, s, s, s), value=-1.0)
            dx, dy = (int(v) for v in torch.randint(0, 2 * s + 1, (2,)))
            images = padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]
        return F.cross_entropy(module(images), labels), images.shape[0]

    def train_module(self, model: nn.Module) -> nn.Module:
        return model

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    def after_step(self, step: int, batch: list[torch.Tensor], info: DistInfo) -> None:
        pass

    def preview(self) -> Image.Image | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
