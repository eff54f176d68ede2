"""Risk: `cluster.ray_address=local` joins a Ray that someone else started on the machine (by
`ray start`, `ray_utils/start_ray.sh`, or a killed one that left its address file) and fails with
Ray's "num_cpus and num_gpus must not be provided"; or `auto` does not join the running one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.runner.test_interrupt import processes_marked

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# Runs the run's own Ray start-up in a fresh process and reports which Ray it got.
PROBE = """
import json, sys, ray
from rlsys.config import load_config
from rlsys.cluster.placement import Layout, start_ray
run = load_config("smollm2-135m-grpo-cpu", ["cluster.device=cpu", "cluster.ray_address=" + sys.argv[1]])
start_ray(run, Layout.of(run))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources()["CPU"],
                  "sized": Layout.of(run).total_devices + 1}))
ray.shutdown()
"""


def _probe(address: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, address], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_env():
    # A private temp dir (short: Ray's socket paths must fit 107 characters) so that the Ray this
    # test starts, and its address file, touch nothing else on the machine.
    temp = tempfile.mkdtemp(prefix="rlsys-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    yield env
    # `ray stop` would stop every Ray on the machine: stop only the processes this test started.
    for pid in processes_marked(f"RAY_TMPDIR={temp}"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_local_starts_its_own_ray_and_auto_joins_the_running_one(ray_env):
    started = subprocess.run([RAY, "start", "--head", "--num-cpus=1", "--include-dashboard=false",
                              "--port=0"], env=ray_env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    address_file = Path(ray_env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    running = address_file.read_text().strip()

    private = _probe("local", ray_env)
    assert private["gcs"] != running and private["cpus"] == private["sized"]  # sized to the config

    joined = _probe("auto", ray_env)
    assert joined["gcs"] == running and joined["cpus"] == 1.0


def test_local_ignores_the_address_file_a_killed_ray_left(ray_env):
    address_file = Path(ray_env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    address_file.parent.mkdir(parents=True)
    address_file.write_text("127.0.0.1:1")  # what a SIGKILLed `ray start` leaves behind
    private = _probe("local", ray_env)
    assert private["cpus"] == private["sized"]
