"""trainer.distributed: the same answers in one process as a 2-rank gloo group gives, and the
components that decide themselves when they run (checkpoints, periodic evaluation)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import distributed
from trainer.engine.checkpoint import CheckpointManager
from trainer.engine.evaluate import PeriodicEval


def test_single_process_is_the_identity():
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


def test_two_ranks_over_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path / "out")), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert (got["rank"], got["world"], got["zero"]) == (rank, 2, rank == 0)
        assert got["sum"] == 3.0 and got["max"] == 1.0
        assert got["any"] is True and got["none"] is False
        assert got["gather"] == ["r0", "r1"] and got["bcast"] == "from1"


def test_checkpoints_and_evaluation_decide_when_they_run(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, every=3)
    assert [s for s in range(1, 10) if ckpt.should_run(s)] == [3, 6, 9]
    assert not any(CheckpointManager(tmp_path, 2, 0, 1, every=0).should_run(s) for s in range(1, 10))
    ev = PeriodicEval(every=4, max_steps=12)
    assert [s for s in range(1, 13) if ev.should_run(s)] == [4, 8]     # step 12: the final evaluation's
    assert not any(PeriodicEval(every=0, max_steps=12).should_run(s) for s in range(1, 13))
