"""Run one function on N local processes joined in a gloo process group (CPU multi-process tests).

    results = run_distributed(worker, world_size=4, args=(...), timeout_s=180)

``worker(rank, world_size, *args)`` must be a module-level function (processes are spawned, so
it is pickled by reference); its return value must be picklable and comes back in rank order.

What must stay true, because CI depends on it:
- a rank that raises fails the call with that rank's traceback (every failed rank's, first
  failure first); the other ranks are killed rather than left blocked in a collective;
- a rank that dies without a word (signal, ``os._exit``) fails the call with its exit code;
- a rank that hangs fails the call after ``timeout_s`` seconds with the ranks that did not
  finish; every spawned process is killed before the call returns or raises.
Ranks rendezvous over TCP on 127.0.0.1 at a free port; each rank uses one intra-op thread so
N ranks do not oversubscribe small CI machines.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

_POLL_S = 0.2
_FAILURE_GRACE_S = 2.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(
    worker: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: Sequence[Any],
    collective_timeout_s: float,
    results: Any,
) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        try:
            value = worker(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _drain(results: Any, grace_s: float, values: dict[int, Any]) -> list[tuple[int, str]]:
    """Failures reported within ``grace_s``; successes go into ``values``."""
    failures: list[tuple[int, str]] = []
    end = time.monotonic() + grace_s
    while (remaining := end - time.monotonic()) > 0:
        try:
            rank, ok, payload = results.get(timeout=remaining)
        except queue.Empty:
            break
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            failures.append((rank, payload))
    return failures


def run_distributed(
    worker: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 180.0,
) -> list[Any]:
    """``worker``'s return values of ranks 0..world_size-1; raises if any rank fails or hangs."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_run_rank,
            args=(worker, rank, world_size, port, tuple(args), timeout_s, results),
            name=f"rank{rank}",
            # Not daemonic: megatron's dist_checkpointing save starts child processes (a
            # multiprocessing manager and writer processes), which daemonic processes may not
            # have. Every rank is still killed in the ``finally`` below.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    values: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            else:
                if ok:
                    values[rank] = pickle.loads(payload)
                else:
                    failures.append((rank, payload))
                continue
            if failures:
                # The failed rank's peers are likely blocked in a collective with it: collect
                # what other ranks report within a short grace period, then stop waiting.
                failures.extend(_drain(results, _FAILURE_GRACE_S, values))
                break
            reported = set(values)
            silent = [rank for rank, p in enumerate(processes) if rank not in reported and p.exitcode not in (None, 0)]
            if silent:
                raise AssertionError(
                    "ranks died without reporting: "
                    + ", ".join(f"rank {rank} (exit code {processes[rank].exitcode})" for rank in silent)
                )
            if time.monotonic() > deadline:
                missing = [rank for rank in range(world_size) if rank not in values]
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=10)
        results.close()
    if failures:
        report = "\n".join(f"--- rank {rank} failed:\n{trace}" for rank, trace in failures)
        raise AssertionError(f"{len(failures)} of {world_size} ranks failed\n{report}")
    return [values[rank] for rank in range(world_size)]
