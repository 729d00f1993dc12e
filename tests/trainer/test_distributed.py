"""trainer.distributed: the same answers in one process as a 2-rank gloo group gives."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port
from trainer import distributed


def test_single_process_is_the_identity(monkeypatch):
    # as in a process without a group (an in-process DeepSpeed test may have started one for the session)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_rank_zero()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x", src=0) == "x"
    distributed.barrier()


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = {
            "rank": distributed.rank(), "world": distributed.world_size(), "zero": distributed.is_rank_zero(),
            "sum": distributed.all_reduce_(torch.tensor([float(rank + 1)])).item(),
            "max": distributed.all_reduce_(torch.tensor([float(rank)]), op="max").item(),
            "any": distributed.any_rank(rank == 1), "none": distributed.any_rank(False),
            "gather": distributed.all_gather_object(f"r{rank}"),
            "bcast": distributed.broadcast_object("from1" if rank == 1 else None, src=1),
        }
        distributed.barrier()
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow               # two processes
def test_two_ranks_over_gloo(tmp_path):
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert (got["rank"], got["world"], got["zero"]) == (rank, 2, rank == 0)
        assert got["sum"] == 3.0 and got["max"] == 1.0
        assert got["any"] is True and got["none"] is False
        assert got["gather"] == ["r0", "r1"] and got["bcast"] == "from1"
