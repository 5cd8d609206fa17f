"""The masked (MaskGIT) order's model: training masks, the loss over hidden positions, bidirectional reads, presets.

Its sampler policy is tested in tests/sampling/test_masked.py; the order contract in tests/models/test_contract.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from argen.errors import ConfigError
from argen.models.interface import Condition, Generator
from argen.models.masked import MASKED_PRESETS, MaskedConfig, MaskedOptions, MaskedTransformer
from argen.models.registry import model_class, order_of_config, presets
from argen.pretrained import load_pretrained


def tiny_masked(**overrides) -> MaskedTransformer:
    """A seeded masked generator small enough for unit tests (3 x 3 tokens, width 32, 2 layers)."""
    fields = dict(vocab_size=16, num_classes=3, grid_size=3, dim=32, num_layers=2, num_heads=4, multiple_of=16)
    torch.manual_seed(0)
    return MaskedTransformer(MaskedConfig(**{**fields, **overrides})).eval()


def _tokens(B=4, seed=0, model=None):
    model = model or tiny_masked()
    return torch.randint(0, model.vocab_size, (B, model.seq_len), generator=torch.Generator().manual_seed(seed))


def test_training_mask_hides_a_cosine_fraction_of_each_sample():
    model = tiny_masked(grid_size=4)
    torch.manual_seed(0)
    r = torch.rand(6)
    torch.manual_seed(0)
    masked = model.training_mask(6, "cpu")
    assert masked.shape == (6, 16) and masked.dtype == torch.bool
    expected = [max(1, math.ceil(math.cos(math.pi / 2 * float(x)) * 16)) for x in r]
    assert masked.sum(dim=1).tolist() == expected
    assert (masked.sum(dim=1) >= 1).all()


def test_loss_is_the_cross_entropy_of_the_hidden_positions_only():
    model = tiny_masked()
    tokens, condition = _tokens(), Condition.classes([0, 1, 2, 0])
    torch.manual_seed(5)
    masked = model.training_mask(4, "cpu")
    assert 0 < masked.sum() < masked.numel()  # the seed hides some positions and shows others
    torch.manual_seed(5)  # the loss draws the same mask
    out = model.loss(tokens, condition)
    logits = model(tokens, masked, condition)
    assert out.num_targets == int(masked.sum())
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits[masked], tokens[masked]).item(), rel=1e-6)
    assert out.nll_sum is None  # a random subset from another is no sequence likelihood


def test_hidden_tokens_are_not_read_only_predicted():
    """A hidden token is a target, never an input: changing it leaves every prediction as it was (the loss then
    changes only through that target), while changing a visible one changes the predictions."""
    model = tiny_masked()
    tokens, condition = _tokens(), Condition.classes([0, 1, 2, 0])
    torch.manual_seed(5)
    masked = model.training_mask(4, "cpu")
    logits = model(tokens, masked, condition)
    hidden_changed = torch.where(masked, (tokens + 1) % model.vocab_size, tokens)
    assert torch.equal(model(hidden_changed, masked, condition), logits)
    visible_changed = torch.where(masked, tokens, (tokens + 1) % model.vocab_size)
    assert not torch.allclose(model(visible_changed, masked, condition), logits)


def test_attention_is_bidirectional():
    """The last token changes the prediction at the first position (no causal mask)."""
    model = tiny_masked()
    tokens, condition = _tokens(B=1), Condition.classes([1])
    visible = torch.zeros_like(tokens, dtype=torch.bool)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.vocab_size
    assert not torch.allclose(model(tokens, visible, condition)[0, 0], model(changed, visible, condition)[0, 0])


def test_condition_is_dropped_in_training_only():
    model = tiny_masked(class_dropout=0.5)
    tokens, condition = _tokens(), Condition.classes([0, 1, 2, 0])
    torch.manual_seed(1)
    evaluated = model.loss(tokens, condition).loss
    torch.manual_seed(1)
    assert torch.equal(model.loss(tokens, condition).loss, evaluated)  # eval: no dropout, same mask, same loss
    model.train()
    losses = set()
    for seed in range(4):
        torch.manual_seed(seed)
        losses.add(model.loss(tokens, condition).loss.item())
    assert len(losses) > 1


def test_predict_is_the_whole_canvas_and_advance_fills_it():
    model = tiny_masked()
    state = model.start(Condition.classes([0, 2]), MaskedOptions(steps=4))
    assert state.num_steps == 4 and not state.filled.any() and state.cache is None
    prediction = model.predict(state)
    assert torch.equal(prediction.positions, torch.arange(9).expand(2, 9))
    assert prediction.logits.shape == (2, 9, 16) and prediction.logits.dtype == torch.float32
    some = torch.tensor([[4, 1], [0, 0]])  # row 1 repeats a position with its value, as the policy pads
    model.advance(state, some, torch.tensor([[7, 3], [5, 5]]))
    assert state.step == 1 and state.filled.sum(dim=1).tolist() == [2, 1]
    assert state.tokens[0, 4] == 7 and state.tokens[0, 1] == 3 and state.tokens[1, 0] == 5
    subset = model.predict(state, torch.tensor([[8], [2]]))
    assert torch.allclose(subset.logits[:, 0], model.predict(state).logits[[0, 1], [8, 2]])


def test_satisfies_the_generator_protocol_and_round_trips(tmp_path):
    model = tiny_masked()
    assert isinstance(model, Generator) and model.token_grid == (3, 3) and model.order.policy == "masked"
    model.save_pretrained(tmp_path / "g")
    loaded = load_pretrained(tmp_path / "g").eval()
    tokens, condition = _tokens(), Condition.classes([0, 1, 2, 0])
    masked = tokens % 2 == 0
    assert torch.equal(loaded(tokens, masked, condition), model(tokens, masked, condition))


@pytest.mark.parametrize(
    "field, value",
    [("dim", 30), ("dim", 24), ("num_heads", 0), ("class_dropout", 1.0), ("vocab_size", 1), ("num_kv_heads", 3)],
)
def test_config_errors_name_the_field(field, value):
    fields = dict(vocab_size=16, num_classes=3, grid_size=3, dim=32, num_layers=2, num_heads=4)
    with pytest.raises(ConfigError, match=field):
        MaskedConfig(**{**fields, field: value})


@pytest.mark.parametrize(
    "field, value", [("steps", 0), ("steps", 2.5), ("choice_temperature", -1.0), ("mask_schedule", "nope")]
)
def test_options_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        MaskedOptions(**{field: value})


def test_mask_schedules_run_from_all_masked_to_none():
    for name in ("cosine", "linear", "square"):
        options = MaskedOptions(mask_schedule=name)
        assert options.mask_ratio(0.0) == pytest.approx(1.0) and options.mask_ratio(1.0) == pytest.approx(0.0)
        ratios = [options.mask_ratio(t / 10) for t in range(11)]
        assert ratios == sorted(ratios, reverse=True)


def test_mnist_preset_is_registered_and_sized_like_the_raster_default():
    assert model_class("masked") is MaskedTransformer
    assert presets()["mnist-masked"] == ("masked", MASKED_PRESETS["mnist-masked"])
    assert order_of_config(MASKED_PRESETS["mnist-masked"]) == "masked"
    model = MaskedTransformer(MASKED_PRESETS["mnist-masked"])
    assert (model.vocab_size, model.num_classes, model.seq_len) == (512, 10, 49)
    assert 1.5e6 < sum(p.numel() for p in model.parameters()) < 2.5e6
