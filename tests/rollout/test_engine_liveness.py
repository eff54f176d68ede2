"""Risk: the liveness check of a busy engine calls a working engine hung (and kills it), or misses a
stopped or idle-in-a-generate one. The decision (``busy_engine_problem``) on real process trees:
a worker with one child, as an SGLang worker has its scheduler. The whole check, through the
command line with a real SGLang engine, is in tests/runner/test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rlsys.rollout.sglang_engine import busy_engine_problem

# The parent waits; its child spins (``busy``) or sleeps.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
child.wait()
"""
SPIN = "while True: pass"
SLEEP = "import time; time.sleep(600)"


@pytest.fixture
def tree(request):
    started = []

    def start(child_code: str) -> tuple[int, int]:
        parent = subprocess.Popen([sys.executable, "-c", TREE, child_code])
        started.append(parent)
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(parent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children, "the child did not start"
        return parent.pid, children[0].pid

    yield start
    for parent in started:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_a_tree_that_computes_is_alive_in_a_generate(tree):
    worker, _ = tree(SPIN)
    problem, cpu = busy_engine_problem(worker, "generate", None)
    assert problem is None
    time.sleep(0.5)
    problem, later = busy_engine_problem(worker, "generate", cpu)
    assert problem is None and later > cpu


def test_a_stopped_child_is_hung_whatever_the_call(tree):
    worker, child = tree(SPIN)
    os.kill(child, signal.SIGSTOP)
    time.sleep(0.2)
    for call in ("generate", "update_weights_from_distributed"):
        problem, _ = busy_engine_problem(worker, call, None)
        assert problem == f"its sglang process (pid {child}) is stopped during {call}", problem
    os.kill(child, signal.SIGCONT)


def test_no_cpu_time_in_a_generate_is_hung_but_not_in_a_weight_update(tree):
    worker, _ = tree(SLEEP)
    time.sleep(0.5)  # the interpreters' start-up CPU time is behind us
    _, cpu = busy_engine_problem(worker, "generate", None)
    time.sleep(0.5)
    problem, _ = busy_engine_problem(worker, "generate", cpu)
    assert problem == "none of its processes used any CPU time during generate since the last check"
    # A scheduler waiting for a trainer's broadcast may idle: not a hang.
    assert busy_engine_problem(worker, "update_weights_from_distributed", cpu)[0] is None


def test_a_dead_worker_is_left_to_the_call_in_flight():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert busy_engine_problem(gone.pid, "generate", 1.0) == (None, None)
