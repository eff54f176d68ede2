"""Risk: a part of a run fails (the engine killed or hung, an actor rank killed, a reward worker
killed) and the run hangs, exits 0, says nothing useful, or leaves processes behind.

Through the real `rlsys train` on the tiny model with real SGLang and Ray. The fault is caused
for real (SIGKILL, SIGSTOP) at the moment named, found from the workers' process titles (Ray
titles a worker "ray::<class>.<method>" while it runs that method). A fatal fault must end the
run within 60 s with exit 1 and one error line naming the step, the phase, the part and the last
complete checkpoint, and leave no process of the run behind. A killed reward worker is not fatal:
its pool is replaced and the run goes on.

`make test` runs the rollout kill and the hang; the sync kill (with a rerun that resumes), the
actor-rank kill (TP2, three workers) and the reward-worker kill are marked long (`make test-long`):
one to two minutes each on 2 cores."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.runner.conftest import loop_overrides
from tests.runner.test_interrupt import processes_marked, start_train, wait_for_line, wait_gone

EXIT_LIMIT_S = 60.0


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find(mark: str, wanted: str) -> list[int]:
    return sorted(pid for pid in processes_marked(mark) if wanted in title(pid))


def wait_until(condition, run, log: Path, what: str, timeout_s: float = 300.0, poll_s: float = 0.002):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)
    run.kill()
    raise AssertionError(f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


class FaultRun:
    """A training run started for a fault, and what it left."""

    def __init__(self, tmp_path: Path, tiny_model_dir: Path, prompt_files, **settings: object) -> None:
        self.output, self.mark, self.log = tmp_path / "run", uuid.uuid4().hex, tmp_path / "console.log"
        self.overrides = lambda steps, **extra: loop_overrides(tiny_model_dir, prompt_files, self.output, **{
            "runner.total_steps": steps, "runner.val_interval": 0, "runner.save_interval": 1,
            "rollout.engine": "sglang", "rollout.max_new_tokens": 32, **settings, **extra})
        self.process = start_train(self.overrides(40), self.mark, self.log)

    def wait_for_checkpoint(self) -> None:
        wait_until(lambda: list((self.output / "checkpoints").glob("step_*/COMPLETE")), self.process, self.log,
                   "first checkpoint")

    def one(self, wanted: str) -> int:
        found = wait_until(lambda: find(self.mark, wanted), self.process, self.log, f"process {wanted!r}", 60, 0.2)
        assert len(found) == 1, [(pid, title(pid)) for pid in found]
        return found[0]

    def wait_title(self, pid: int, wanted: str, timeout_s: float = 120.0) -> None:
        wait_until(lambda: title(pid).startswith(wanted), self.process, self.log, f"{wanted!r} in pid {pid}",
                   timeout_s)

    def failed_cleanly(self, faulted_at: float, *expected: str) -> tuple[float, str]:
        """The exit after the fault: its seconds and its error line, each promise checked."""
        code = self.process.wait(timeout=180)
        took = time.monotonic() - faulted_at
        lines = self.log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("rlsys train: error: ")]
        assert code == 1 and len(errors) == 1, "\n".join(lines[-40:])
        assert not any(line.startswith("Traceback") for line in lines), "\n".join(lines[-60:])
        newest = sorted((self.output / "checkpoints").glob("step_*/COMPLETE"))[-1].parent
        message = errors[0]
        for text in (*expected, f"last complete checkpoint: {newest} "):
            assert text in message, message
        assert took < EXIT_LIMIT_S, f"{took:.1f} s from the fault to the exit: {message}"
        left = wait_gone(self.mark)
        assert not left, f"processes of the run left after its exit: {[(pid, title(pid)) for pid in left]}"
        print(f"\n{took:.1f} s from the fault to the exit: {message}")
        return took, message


@pytest.mark.slow
def test_an_engine_killed_during_a_rollout_ends_the_run_naming_it(tiny_model_dir, prompt_files, tmp_path):
    run = FaultRun(tmp_path, tiny_model_dir, prompt_files)
    run.wait_for_checkpoint()
    engine, scheduler = run.one("ray::EngineWorker"), run.one("sglang::scheduler")
    run.wait_title(engine, "ray::EngineWorker.generate")
    os.kill(scheduler, signal.SIGKILL)
    run.failed_cleanly(time.monotonic(), "failed in rollout: engine 0 (generate): sglang engine 0: generate: ",
                       "the engine process exited")


@pytest.mark.long
def test_an_engine_killed_during_a_weight_sync_ends_the_run_and_the_rerun_resumes(tiny_model_dir, prompt_files,
                                                                                  tmp_path):
    run = FaultRun(tmp_path, tiny_model_dir, prompt_files)
    run.wait_for_checkpoint()
    engine, actor = run.one("ray::EngineWorker"), run.one("ray::ActorWorker")
    worker = run.one("rlsys.rollout.sglang_engine")
    # Stopped between its rollout and the sync, the engine holds the sync until it is killed.
    for _ in range(10):
        run.wait_title(engine, "ray::EngineWorker.generate")
        wait_until(lambda: title(engine) == "ray::EngineWorker", run.process, run.log, "the end of a rollout", 120)
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_until(lambda: title(actor).startswith("ray::ActorWorker.sync_weights"), run.process, run.log,
                       "the sync", timeout_s=10)
            break
        except AssertionError:
            os.kill(worker, signal.SIGCONT)
            assert run.process.poll() is None, run.log.read_text()[-4000:]
    else:
        pytest.fail("never caught the run in a sync")
    time.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    _, message = run.failed_cleanly(time.monotonic(), "failed in sync: actor rank 0 (sync_weights): weight sync into "
                                    "sglang engine 0 via colocated transport failed at begin: sglang engine 0: "
                                    "begin_weight_update: the engine process exited with code -9 (its log: ")
    saved = sorted((run.output / "checkpoints").glob("step_*/COMPLETE"))[-1].parent
    step = int(saved.name.split("_")[1])
    assert f"step {step + 1} failed in sync" in message  # the step after the last save: its update is lost

    rerun_log = tmp_path / "rerun.log"
    rerun = start_train(run.overrides(step + 1), run.mark, rerun_log)
    assert rerun.wait(timeout=300) == 0, rerun_log.read_text()[-4000:]
    assert f"[rlsys] resumed from {saved} (step {step}, data epoch " in rerun_log.read_text()
    assert not wait_gone(run.mark)


@pytest.mark.slow
def test_a_stopped_engine_is_found_by_the_liveness_check(tiny_model_dir, prompt_files, tmp_path):
    run = FaultRun(tmp_path, tiny_model_dir, prompt_files, **{"rollout.health_check_s": 3})
    run.wait_for_checkpoint()
    engine, scheduler = run.one("ray::EngineWorker"), run.one("sglang::scheduler")
    run.wait_title(engine, "ray::EngineWorker.generate")
    os.kill(scheduler, signal.SIGSTOP)
    took, _ = run.failed_cleanly(time.monotonic(), "failed in rollout: engine 0 (generate): sglang engine 0: generate: hung: ",
                                 f"sglang process (pid {scheduler}) is stopped during generate",
                                 "(rollout.health_check_s=3)")
    assert took < 3 * 3 + 30  # found within two periods, then the shutdown


@pytest.mark.long
def test_an_actor_rank_killed_in_training_ends_the_run_while_its_peer_waits(tiny_model_dir, prompt_files, tmp_path):
    run = FaultRun(tmp_path, tiny_model_dir, prompt_files, **{
        "actor.tp": 2, "cluster.placement": "disaggregated", "cluster.devices_per_node": 3,
        "cluster.rollout_devices": 1})
    run.wait_for_checkpoint()
    ranks = wait_until(lambda: len(found := find(run.mark, "ray::ActorWorker")) == 2 and found, run.process,
                       run.log, "two actor ranks", 60, 0.2)
    victim = ranks[-1]
    run.wait_title(victim, "ray::ActorWorker.train_step")
    os.kill(victim, signal.SIGKILL)
    run.failed_cleanly(time.monotonic(), "failed in train: actor rank ", "(train_step): its Ray worker ActorWorker "
                       f"(pid {victim}) died")


@pytest.mark.long
def test_a_killed_reward_worker_is_replaced_and_the_run_goes_on(tiny_model_dir, prompt_files, tmp_path):
    run = FaultRun(tmp_path, tiny_model_dir, prompt_files, **{"runner.save_interval": 0})
    wait_for_line(run.log, "[rlsys] step 1:", run.process, timeout_s=300)
    # The driver's reward forkserver; the workers are its forks (and carry its title).
    servers = [pid for pid in find(run.mark, "rlsys.reward.pool") if psutil.Process(pid).ppid() == run.process.pid]
    assert len(servers) == 1, servers
    workers = psutil.Process(servers[0]).children()
    assert workers, "no reward worker"
    for worker in workers:
        worker.kill()
    killed_at = time.monotonic()
    wait_for_line(run.log, "[rlsys] step 3:", run.process, timeout_s=120)
    assert run.process.poll() is None
    run.process.send_signal(signal.SIGTERM)  # enough: stop it at the next safe point
    assert run.process.wait(timeout=120) == 128 + signal.SIGTERM
    from rlsys.plot import read_scalars

    restarts = read_scalars(run.output / "tensorboard").get("reward/pool_restarts", [])
    assert max((value for _, value in restarts), default=0) >= 1, restarts
    assert not wait_gone(run.mark)
    print(f"\nreward workers killed; the run went on ({time.monotonic() - killed_at:.1f} s to step 3)")
