import math

import torch
from torch.utils.data import TensorDataset

from argen.eval.likelihood import bits_per_token
from tests.conftest import tiny_raster


def test_uniform_prior_costs_log2_vocabulary_bits():
    model = tiny_raster(vocab_size=37, num_classes=2)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: the uniform distribution
    data = TensorDataset(torch.randint(0, 37, (20, 9)), torch.randint(0, 2, (20,)))
    assert abs(bits_per_token(model, data, batch_size=7) - math.log2(37)) < 1e-5
