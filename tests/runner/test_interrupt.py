"""Risk: Ctrl-C or a scheduler's SIGTERM loses the work since the last save, leaves Ray, the engine
or the actor running, or exits with a code that a script cannot tell from a crash.

Through the real `rlsys train` on the tiny model with real SGLang and Ray: the signal is sent to
the driver after its first step; the run must stop at the next safe point within 60 s, save,
exit 128 + signal, leave no process of its own behind, and (after SIGTERM) a rerun must resume
from that save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.runner.conftest import loop_overrides

REPO = Path(__file__).resolve().parents[2]


def processes_marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (every process of a run inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_train(overrides: list[str], mark: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RLSYS_TEST_RUN": mark}
    return subprocess.Popen([sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert process.poll() is None, f"the run ended before {text!r}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no {text!r} within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")


def wait_gone(mark: str, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_stops_cleanly_and_the_rerun_resumes(signum, tiny_model_dir, prompt_files, tmp_path):
    output, mark = tmp_path / "run", uuid.uuid4().hex
    def overrides(steps: int) -> list[str]:
        return loop_overrides(tiny_model_dir, prompt_files, output, **{
            "runner.total_steps": steps, "runner.val_interval": 0, "runner.save_interval": 0})

    log = tmp_path / "console.log"
    run = start_train(overrides(50), mark, log)
    wait_for_line(log, "[rlsys] step 1:", run, timeout_s=300)
    os.kill(run.pid, signum)
    sent = time.monotonic()
    code = run.wait(timeout=120)
    took = time.monotonic() - sent
    console = log.read_text()
    assert code == 128 + signum, console[-4000:]
    assert took < 60, f"{took:.0f}s from the signal to the exit"
    checkpoints = sorted((output / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file(), console[-4000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step" in console and f"last complete checkpoint: {checkpoints[-1]}" in console
    assert not wait_gone(mark), f"processes of the run left after its exit: {processes_marked(mark)}"
    if signum != signal.SIGTERM:
        return  # the resume after a stop is the same for both signals: checked once

    saved_step = int(checkpoints[-1].name.split("_")[1])
    rerun_log = tmp_path / "rerun.log"
    rerun = start_train(overrides(saved_step + 1), mark, rerun_log)
    assert rerun.wait(timeout=300) == 0, rerun_log.read_text()[-4000:]
    assert f"[rlsys] resumed from {checkpoints[-1]} (step {saved_step}," in rerun_log.read_text()
    assert not wait_gone(mark)
