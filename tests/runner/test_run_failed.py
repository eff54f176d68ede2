"""Risk: the one line a failed run ends with hides what failed, or a bug in rlsys loses its
traceback because it is taken for a fault of a part (which prints none)."""

from __future__ import annotations

from pathlib import Path

from rlsys.cluster.groups import WorkerFailed
from rlsys.runner.checkpoints import CheckpointSaveError
from rlsys.runner.grpo import RunFailed


class _RayLike(RuntimeError):
    """As Ray re-raises a worker's error: the remote traceback as text, the original as ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::EngineWorker.generate() (pid=1, ip=10.0.0.1)\nTraceback (most recent call last): ...")
        self.cause = cause


def test_a_part_that_failed_is_named_in_one_line_with_the_last_checkpoint():
    engine_error = RuntimeError("sglang engine 0: generate: the engine process exited with code -9")
    failed = RunFailed(3, "rollout", WorkerFailed("engine 0 (generate)", _RayLike(engine_error)),
                       Path("/out/checkpoints/step_00000002"))
    assert failed.expected
    assert str(failed) == ("step 3 failed in rollout: engine 0 (generate): RuntimeError: sglang engine 0: generate: "
                           "the engine process exited with code -9; last complete checkpoint: "
                           "/out/checkpoints/step_00000002 (a rerun with the same runner.output_dir resumes from it)")


def test_a_failure_before_any_step_or_checkpoint_says_so():
    failed = RunFailed(0, "validation", WorkerFailed("engine 1 (generate)", TimeoutError("no answer")), None)
    assert str(failed) == ("validation before the first step failed: engine 1 (generate): TimeoutError: no answer; "
                           "no checkpoint was saved yet")


def test_faults_of_parts_are_expected_and_bugs_are_not():
    assert RunFailed(1, "checkpoint", CheckpointSaveError("saving checkpoint x failed: [Errno 28]"), None).expected
    assert RunFailed(1, "rollout", TimeoutError("rollout: no request of engines [0] finished"), None).expected
    bug = RunFailed(1, "train", KeyError("policy_loss"), None)
    assert not bug.expected  # rlsys train prints its traceback
    assert str(bug).startswith("step 1 failed in train: KeyError: 'policy_loss'; ")
