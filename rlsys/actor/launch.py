"""Run one function on N local processes joined in a gloo process group (CPU megatron jobs).

Used by ``rlsys convert``, which must start its own ranks from a plain
command line. Processes are spawned (never forked: megatron and torch keep threads and global
state), rendezvous over TCP on 127.0.0.1 at a free port, and split the host's cores evenly
(``torch.set_num_threads``). A rank that raises makes the call raise with its traceback, after
the other ranks are terminated (``torch.multiprocessing``'s behaviour). Return values travel
through pickle files in a temporary directory (a queue could block a rank on a full pipe while
the parent waits in ``join``).

The function must be importable by name (module level), and the calling script must guard its
entry point with ``if __name__ == "__main__":`` (spawned processes import the main module).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    function: Callable[..., Any],
    world_size: int,
    port: int,
    args: Sequence[Any],
    threads: int,
    results_dir: str,
    timeout_s: float,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        value = function(*args)
    finally:
        from rlsys.actor.parallel import destroy_parallel

        destroy_parallel()
        dist.destroy_process_group()
    Path(results_dir, f"{rank}.pkl").write_bytes(pickle.dumps(value))


def run_on_cpu_processes(
    function: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout_s: float = 3600.0
) -> list[Any]:
    """``function(*args)`` on ranks 0..world_size-1 of a new gloo group; their return values in rank order."""
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="rlsys-ranks-") as results_dir:
        mp.start_processes(
            _rank_main,
            args=(function, world_size, _free_port(), tuple(args), threads, results_dir, timeout_s),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [pickle.loads(Path(results_dir, f"{rank}.pkl").read_bytes()) for rank in range(world_size)]
