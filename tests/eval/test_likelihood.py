import math

import pytest
import torch
from torch.utils.data import TensorDataset

from argen.eval.likelihood import likelihood
from argen.models.interface import Condition
from tests.conftest import tiny_raster


def test_uniform_prior_costs_log2_vocabulary_bits():
    model = tiny_raster(vocab_size=37, num_classes=2)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: the uniform distribution
    data = TensorDataset(torch.randint(0, 37, (20, 9)), torch.randint(0, 2, (20,)))
    assert abs(likelihood(model, data, batch_size=7).bits_per_token - math.log2(37)) < 1e-5


def test_bits_per_position_make_up_the_mean():
    torch.manual_seed(0)
    model = tiny_raster(vocab_size=37, num_classes=2)
    data = TensorDataset(torch.randint(0, 37, (20, 9)), torch.randint(0, 2, (20,)))
    found = likelihood(model, data, batch_size=7)  # batches of 7, 7 and 6: the mean is over items, not batches
    assert found.bits_per_position.shape == (9,)
    with torch.no_grad():  # the whole set in one batch: the loss's mean, in bits
        whole = model.loss(data.tensors[0], Condition.classes(data.tensors[1])).loss.item() / math.log(2)
    assert found.bits_per_token == pytest.approx(whole, rel=1e-5)
    assert found.bits_per_position.std() > 0  # a figure per position, not the mean repeated
    with torch.no_grad():
        model.output.weight.zero_()
    uniform = likelihood(model, data, batch_size=7).bits_per_position
    assert torch.allclose(uniform, torch.full((9,), math.log2(37)))
