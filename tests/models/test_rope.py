import torch

from argen.models.rope import RopeTable, rope_2d_table
from tests.conftest import tiny_raster


def test_the_table_follows_the_model_but_stays_float32_when_it_is_cast():
    model = tiny_raster(grid_size=12)
    exact = rope_2d_table(12, model.config.dim // model.config.num_heads)
    for cast in (torch.bfloat16, torch.float16):
        model.to(cast)
        assert model.output.weight.dtype == cast
        assert model.rope.table.dtype == torch.float32 and torch.equal(model.rope.table, exact)
    # what a bfloat16 table would have been: the far positions' angles rounded
    assert (exact.bfloat16().float() - exact).abs().max() > 1e-3
    assert "rope.table" not in model.state_dict()  # derived from the config


def test_meta_initialisation_leaves_the_table_right():
    with torch.device("meta"):
        rope = RopeTable(4, 16)
    assert rope.table.is_meta
    rope.to_empty(device="cpu")
    assert torch.equal(rope.table, rope_2d_table(4, 16))
    assert torch.equal(rope[torch.tensor([[0, 5]])], rope_2d_table(4, 16)[torch.tensor([[0, 5]])])
