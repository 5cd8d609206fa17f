"""MAR's position policy ("Autoregressive Image Generation without Vector Quantization", Li et al. 2024, §3.4):
each sample follows its own random order, revealing floor(n cos(pi/2 (k + 1) / T)) fewer masked tokens after
step k (MaskGIT's cosine schedule), the last step revealing the rest.

The order is drawn from the sample's own generator, so a seed gives the same image alone or in any batch. Known
tokens (editing) are filled before the first step and sit at the end of the order, which MAR reveals first.
MAR's linear guidance schedule reads the share of tokens known after the step, floor-clamped as the official
code does: at the last step it still counts one token as masked, so the scale reaches 1 + (cfg - 1)(L - 1)/L.
"""

from __future__ import annotations

import torch

from argen.models.interface import DecodeState
from argen.sampling.positions import PositionPolicy


class MARPolicy(PositionPolicy):
    def begin(self, state: DecodeState) -> None:
        self.write_known(state)
        B, L = self.num_samples, state.filled.shape[1]
        if state.num_steps < 1:
            raise ValueError(f"MAR needs at least one step, got {state.num_steps}")
        filled = state.filled[:B].cpu()
        # Keys in [0, 1) for the positions to generate, [1, 2) for known ones: those end the order.
        keys = torch.stack([self.draw_order(b, L) + filled[b].float() for b in range(B)])
        self.orders = keys.argsort(dim=1, stable=True).to(state.filled.device)  # (B, L)
        self.masked_at_start = (~filled).sum(dim=1).to(state.filled.device)  # (B,)

    def draw_order(self, b: int, length: int) -> torch.Tensor:
        """(length,) keys in [0, 1) on the CPU whose ascending order is sample b's generation order reversed
        (MAR keeps the first positions of its order masked longest)."""
        g = self.generators[b] if self.generators is not None else None
        return torch.rand(length, generator=g, device=g.device if g is not None else "cpu").cpu()

    def _masked_after(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) still masked now, and (B,) masked after this step by MAR's formula max(1, min(now - 1,
        floor(n cos(...))))."""
        now = (~state.filled[: self.num_samples]).sum(dim=1)
        return now, self.options.still_masked(state.step, state.num_steps, now, self.masked_at_start)

    def positions(self, state: DecodeState) -> torch.Tensor:
        """(B, k) positions revealed this step, ascending per sample (MAR's row order); a sample revealing fewer
        than k pads with an already known position or its first one (the loop gives padding no new value)."""
        now, after = self._masked_after(state)
        if state.step + 1 >= state.num_steps:
            after = torch.zeros_like(after)  # the last step reveals everything left
        after = torch.minimum(after, now)
        counts = now - after
        k = int(counts.max())
        rows = []
        for b in range(self.num_samples):
            chosen = self.orders[b, int(after[b]) : int(now[b])].sort().values
            filler = chosen[:1] if len(chosen) else self.orders[b, min(int(now[b]), self.orders.shape[1] - 1)][None]
            rows.append(torch.cat([chosen, filler.expand(k - len(chosen))]))
        return torch.stack(rows)

    def guidance_progress(self, state: DecodeState) -> torch.Tensor:
        """(B,) share of the tokens to generate that are known after this step, as MAR's linear schedule reads
        it: (n - mask_len) / n with mask_len clamped to at least 1, also at the last step."""
        _, after = self._masked_after(state)
        n = self.masked_at_start.clamp(min=1)
        return (n - after).double() / n.double()
