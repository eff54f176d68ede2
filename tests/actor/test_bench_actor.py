"""Risk: the GPU shape mode of ``bench/bench_actor.py`` is broken and nobody finds out before a GPU run.

Its ``--dry-run`` runs the same code path on the CPU: it must build megatron's TransformerConfig of
the full Qwen2.5-7B shape, report the FLOPs per token the MFU uses (checked against the formula by
hand), and time a bf16 forward + backward of the cut model (bf16 parameters, the
DistributedOptimizer's float32 main copy) through the actor, printing the command first.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shape_mode_dry_run_on_cpu() -> None:
    arguments = ["--shape", "qwen2.5-7b", "--random-weights", "--dtype", "bf16", "--seq-len", "4096", "--dry-run"]
    completed = subprocess.run(
        [sys.executable, "-W", "ignore", str(REPO_ROOT / "bench" / "bench_actor.py"), *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0] == "$ .venv/bin/python bench/bench_actor.py " + " ".join(arguments)
    # Qwen2.5-7B: 28 layers x (q, k, v, o and the SwiGLU MLP) plus the 152,064 x 3,584 output layer.
    per_layer = 3584 * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944
    expected = 6 * (28 * per_layer + 152064 * 3584) + 6 * 28 * 4096 * 3584
    assert f"{expected / 1e9:.2f} GFLOP per token" in lines[1], lines[1]
    timed = re.search(r"dry run \(bf16, CPU, cut model\): 2 x 64 tokens, ([0-9.]+) s / step, ([0-9.]+) tokens/s",
                      lines[2])
    assert timed is not None, completed.stdout
    assert float(timed.group(2)) > 0
