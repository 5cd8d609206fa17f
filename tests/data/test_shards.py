import numpy as np
import torch

from argen.data.datasets import ArrayDataset
from argen.data.shards import TokenShards, write_shards
from tests.conftest import tiny_vq


def test_shards_round_trip_equals_direct_encoding(tmp_path):
    tokenizer = tiny_vq(codebook_size=32)
    pixels = np.random.default_rng(0).integers(0, 256, (23, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(23) % 3
    data = ArrayDataset(pixels, labels, ["a", "b", "c"])
    write_shards(tokenizer, data, tmp_path, batch_size=5, shard_size=10)
    shards = TokenShards(tmp_path)
    assert len(shards) == 23 and len(shards.meta["shards"]) == 3
    assert shards.seq_len == 64 and shards.class_names == ["a", "b", "c"]
    with torch.no_grad():
        direct = tokenizer.eval().encode(data.images)
    got = torch.stack([shards[i][0] for i in range(23)])
    assert torch.equal(got, direct)
    assert [shards[i][1].item() for i in range(23)] == labels.tolist()
    assert isinstance(shards.tokens[0], np.memmap)
