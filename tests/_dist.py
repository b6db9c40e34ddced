"""Run a function on several gloo ranks in fresh processes, with a hard deadline.

A hang is a test failure: on timeout every rank is killed and the test fails with what the ranks
printed. Each rank writes its result with ``torch.save`` to ``out_dir/rank{r}.pt``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(fn, world: int, out_dir: Path, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns their results in rank order."""
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, free_port(), str(out_dir), args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout}s (hang in a collective?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
