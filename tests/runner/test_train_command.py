"""Risk: a bad launch (unknown config, bad field, missing data file, missing wandb) fails late,
deep inside a worker, or with a message that does not say what to fix."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlsys", "train", *args], capture_output=True, text=True,
                          timeout=300)


def test_unknown_config_lists_the_available_ones():
    result = _train("no-such-config")
    assert result.returncode == 2
    assert "unknown config 'no-such-config'" in result.stderr and "smollm2-135m-grpo-cpu" in result.stderr


@pytest.mark.parametrize("overrides, field", [
    (["actor.tp=2", "cluster.devices_per_node=2"], "actor.tp"),
    (["actor.bogus=1"], "actor.bogus"),
    (["data.train_files=[no/such/file.jsonl]"], "data.train_files[0]"),
    (["runner.loggers=[tensorboard,wandb]"], "runner.loggers"),
])
def test_bad_launch_fails_at_start_naming_the_field(overrides, field, tmp_path):
    result = _train("smollm2-135m-grpo-cpu", f"runner.output_dir={tmp_path}", *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert field in result.stderr, result.stderr[-2000:]
