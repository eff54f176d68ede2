"""Where the workers' output goes: one file per worker under ``<runner.output_dir>/logs/``.

    actor_rank_0.log      an actor rank's Ray actor (Megatron, the weight sync)
    engine_0.log          an engine's Ray actor (the HF engine runs here)
    engine_0.sglang.log   its sglang processes (the rollout worker, scheduler and detokenizer)

What must stay true:
- The console is the driver's: the progress bar, one line per step, and once at start the path of
  this folder. Ray does not forward the workers' output (``log_to_driver=False``,
  ``rlsys.cluster.placement.start_ray``), and each worker points its stdout and stderr at its file
  (``to_file``) before it imports megatron or sglang; the file descriptors, so that output from C++
  and from processes the worker starts goes there too.
- Errors still reach the console: Ray raises a worker's exception in the driver with the worker's
  traceback, a dead sglang engine's error quotes the end of its log, and ``rlsys train`` ends a
  failed run by naming this folder.
- A resumed run appends to the files of the run it continues; every Ray worker starts its part with
  a header line (time, pid, host).
- Output of a worker before it redirects stays in Ray's own session logs (``/tmp/ray/session_*/logs``
  on the worker's node), as do Ray's daemons' logs. The path is the same on every node: on several
  nodes the files are where ``runner.output_dir`` is, a shared filesystem or each node's own disk.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

LOG_DIR = "logs"


def log_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOG_DIR


def to_file(path: Path) -> None:
    """From now on this process's stdout and stderr (file descriptors 1 and 2) append to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
    finally:
        os.close(descriptor)
    print(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}", flush=True)
