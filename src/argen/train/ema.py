"""Exponential moving average of a model's parameters (and a copy of its buffers)."""

from __future__ import annotations

import torch
from torch import nn

from argen.errors import CheckpointError
from argen.pretrained import check_state_dict


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.param_names = {n for n, _ in model.named_parameters()}
        self.shadow = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Short runs: ramp the decay up so that early random weights do not dominate the average.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.param_names:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int, source: str = "EMA state") -> None:
        """Strict, like model loading: the same keys and shapes, else a CheckpointError listing them."""
        check_state_dict(self.shadow, state, source, "the EMA of this model")
        if not isinstance(updates, int) or updates < 0:
            raise CheckpointError(f"{source}: the EMA update count must be an integer >= 0, got {updates!r}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.updates = updates

    def weights_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights cast to the model's own dtypes (for saving as a pretrained folder)."""
        own = model.state_dict()
        return {k: v.to(own[k].dtype) for k, v in self.shadow.items()}
