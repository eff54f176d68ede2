"""Risk: the console a person reads is buried under third-party noise (warnings that leave nothing
to act on, Ray forwarding every worker's output), a filter hides more than its one message, the
worker logs the console points to are missing, or a worker's error no longer reaches the console."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from rlsys.platform import quiet
from tests.runner.conftest import loop_overrides


def test_filters_drop_their_messages_and_nothing_else():
    # In a fresh interpreter: the filters are process-wide.
    script = """
import logging, warnings
from rlsys.platform.quiet import quiet_third_party
quiet_third_party()
quiet_third_party()
logging.basicConfig(format="%(message)s")
warnings.warn("Apex is not installed. Falling back to Torch Norm")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated (as a UserWarning it shows)")
warnings.warn("Apex is not installed, and this is another message")
warnings.warn("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed (from elsewhere)")
logging.getLogger("sglang.kernels.jit.utils.arch").warning("Cannot detect CUDA architecture.")
logging.getLogger("sglang.kernels.jit.utils.arch").warning("Cannot detect CUDA architecture. And more")
logging.getLogger("sglang.elsewhere").warning("Cannot detect CUDA architecture.")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = [line.split(": ", 1)[-1] for line in result.stderr.splitlines() if not line.startswith("  ")]
    assert shown == [
        "UserWarning: `torch.distributed.all_gather_into_tensor` is deprecated (as a UserWarning it shows)",
        "UserWarning: Apex is not installed, and this is another message",
        "UserWarning: The .grad attribute of a Tensor that is not a leaf Tensor is being accessed (from elsewhere)",
        "Cannot detect CUDA architecture. And more",
        "Cannot detect CUDA architecture.",
    ], result.stderr


def _run_in_terminal(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal of 160 columns, as a person would."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_train_console_is_the_bar_and_the_step_lines(tiny_model_dir, prompt_files, tmp_path):
    output = tmp_path / "run"
    overrides = loop_overrides(tiny_model_dir, prompt_files, output, **{
        "rollout.engine": "sglang", "runner.total_steps": 1, "runner.val_interval": 0, "runner.progress_bar": True})
    code, console = _run_in_terminal([sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", *overrides],
                                     timeout_s=600)
    assert code == 0, console[-4000:]

    # Lines as a person reads them: a bar redraw (\r) is a line, colour codes are invisible.
    console = re.sub(r"\x1b\[[0-9;]*m", "", console)
    lines = [line.strip() for line in console.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0] == "[rlsys] data: training 8 prompts; validation 4 prompts", lines[:3]
    assert lines[1] == f"[rlsys] writing to {output}/; worker logs in {output}/logs/", lines[:3]
    assert any(line.startswith("[rlsys] step 1: rollout/rewards=") for line in lines), lines
    assert any("1/1 [" in line and "step_s=" in line for line in lines), "no progress bar"
    assert lines[-1].startswith("[rlsys train] done"), lines[-3:]
    # Nothing else: no line of a worker (Ray prefixes them with the actor's name), no filtered warning.
    others = [line for line in lines if not line.startswith("[rlsys") and "/1 [" not in line]
    assert not others, others
    assert not quiet.filtered_lines(console)

    # The workers' output is in their files, where the filters held too (at the source).
    logs = {path.name: path.read_text() for path in (output / "logs").iterdir()}
    assert set(logs) == {"actor_rank_0.log", "engine_0.log", "engine_0.sglang.log"}
    assert all(text.startswith("===== ") for name, text in logs.items() if not name.endswith(".sglang.log"))
    assert logs["engine_0.sglang.log"].strip()
    leaked = {name: quiet.filtered_lines(text) for name, text in logs.items() if quiet.filtered_lines(text)}
    assert not leaked, leaked


def test_a_failing_worker_reaches_the_console_with_where_its_log_is(tiny_model_dir, prompt_files, tmp_path):
    # Truncated weights: the driver reads only the config and tokenizer, the workers fail loading.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    output = tmp_path / "run"
    overrides = loop_overrides(broken, prompt_files, output, **{"rollout.engine": "hf", "runner.total_steps": 1})
    result = subprocess.run([sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "ray::" in result.stderr and "Traceback" in result.stderr, result.stderr[-4000:]  # the worker's own
    assert result.stderr.rstrip().endswith(f"rlsys train: the workers' full logs are in {output}/logs/")
