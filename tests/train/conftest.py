import pytest
import torch

from argen.data.datasets import load_dataset
from argen.data.shards import write_shards
from argen.pipeline import resolve
from argen.pretrained import load_pretrained


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """Real tokens: 320 MNIST digits encoded by the shipped tokenizer."""
    data = load_dataset("mnist", 28)
    subset = data.subset(torch.arange(0, 5000, 5000 // 320)[:320].numpy())
    tokenizer = load_pretrained(resolve("default") / "tokenizer")
    return write_shards(tokenizer, subset, tmp_path_factory.mktemp("shards"), batch_size=160)
