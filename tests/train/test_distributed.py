import pytest

from argen.train.distributed import DistInfo, rank_batches, run_on_main


def test_ranks_are_dealt_the_single_process_batches():
    one = rank_batches(range(40), 15, DistInfo())
    assert one == [range(0, 15), range(15, 30), range(30, 40)]
    assert rank_batches(range(10, 23), 5, DistInfo()) == [range(10, 15), range(15, 20), range(20, 23)]
    for world in (2, 3, 5):
        parts = [rank_batches(range(40), 15, DistInfo(rank=r, world_size=world)) for r in range(world)]
        # gather_in_order puts batch b back from rank b % world, position b // world
        assert [parts[b % world][b // world] for b in range(len(one))] == one
        assert sum(len(p) for p in parts) == len(one)


def test_run_on_main_without_a_process_group_just_runs():
    assert run_on_main(lambda: 7) == 7
    with pytest.raises(ValueError, match="bad"):
        run_on_main(lambda: (_ for _ in ()).throw(ValueError("bad")))
