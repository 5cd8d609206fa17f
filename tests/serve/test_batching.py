"""Rows at different steps in one pass: each row's logits are the ones it gets alone, to the last bit.

This is the mechanism under continuous batching (`batching.stack(..., aligned=False)` and `OrderSpec.row_steps`),
checked below the scheduler. A state here has one or two rows: BLAS would compute a product of so few rows with
other kernels than a larger one, and `layers.Linear` pads it so that a row's values do not depend on the batch.
Random-order is exact except in a newcomer's first pass (below).
"""

import pytest
import torch

from argen.pipeline import ARPipeline
from argen.serve import batching


@pytest.fixture(scope="module", params=["raster", "masked", "random-order"])
def model(request):
    return ARPipeline.from_pretrained(request.param).generator


def predict(model, state):
    """The order's prediction for each row's first unfilled position (random-order is told it; raster predicts
    its own next one; the masked order predicts every position)."""
    if model.order.policy == "random":
        return model.predict(state, (~state.filled).float().argmax(1, keepdim=True))
    return model.predict(state)


def advanced(model, labels, steps):
    """A state of `labels` standing at step `steps`: each step commits each row's first unfilled position (raster's
    own next one; any position will do for the masked order) with some token."""
    state = model.start(torch.tensor(labels), None)
    for _ in range(steps):
        predict(model, state)  # raster and random-order write their caches as they predict
        free = (~state.filled).float().argmax(1, keepdim=True)
        model.advance(state, free, (free * 37 + torch.tensor(labels)[:, None]) % model.vocab_size)
    return state


@torch.no_grad()
def test_rows_at_different_steps_get_their_own_logits_bit_for_bit(model):
    assert model.order.row_steps
    ahead = advanced(model, [1], 9)
    alone_ahead = predict(model, advanced(model, [1], 9)).logits
    alone_behind = predict(model, advanced(model, [5, 6], 0)).logits  # its first pass: cls not cached
    mixed = batching.stack([advanced(model, [5, 6], 0), ahead], aligned=False)
    logits = predict(model, mixed).logits
    assert torch.equal(logits[:2], alone_behind)
    if model.order.policy == "random":
        # The newcomer's first pass adds a cls entry to every row's entries (3 per row instead of 2), and the
        # fused CPU attention kernel rounds a query differently when its row holds another number of queries:
        # equal to ~1e-7 here, not to the bit (tokens and images in tests/serve/test_scheduler.py are).
        torch.testing.assert_close(logits[2:], alone_ahead, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits[2:], alone_ahead)
    assert not torch.equal(alone_ahead[:1], alone_behind[:1])  # the rows really stood elsewhere


def test_aligned_stacking_refuses_states_at_different_steps(model):
    with pytest.raises(AssertionError):
        batching.stack([advanced(model, [1, 2, 3, 4], 1), advanced(model, [1, 2, 3, 4], 2)])


@torch.no_grad()
def test_mar_rows_holding_different_numbers_of_latents_get_their_own_z_bit_for_bit():
    """MAR's encoder sees only a row's known latents: rows at different steps know different numbers of them, and
    the encoder runs each group of equal counts together, so every row's z is the one it gets alone."""
    model = ARPipeline.from_pretrained("mar").generator
    g = torch.Generator().manual_seed(0)

    def state(known: int, label: int):
        s = model.start(torch.tensor([label] * 2), None)
        for row in range(2):  # each row knowing `known` latents of its own
            where = torch.randperm(model.seq_len, generator=g)[:known]
            s.tokens[row, where] = torch.randn(known, model.token_dim, generator=g)
            s.filled[row, where] = True
        return s

    states = [state(0, 1), state(5, 2), state(20, 3), state(48, 4)]
    alone = torch.cat([model.predict(s).z for s in states])
    mixed = model.predict(batching.stack(states, aligned=False)).z
    assert torch.equal(mixed, alone)
    assert not torch.equal(alone[:2], alone[2:4])
