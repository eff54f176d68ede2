"""Risk: a resumed run is not the run it continues (data position, optimizer, lr schedule, RNG or
engine weights not restored), or it resumes from a checkpoint whose save never finished, or its
console does not say which checkpoint and data position it continues from.

N steps straight must equal k steps + resume + N-k steps, metric by metric (timings aside), on
CPU where every part is deterministic: the HF engine samples from a seed derived from the step,
Megatron on CPU is bitwise reproducible. The resume at step 2 is also an epoch boundary (8 training
prompts, 4 per step)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlsys.config import load_config
from rlsys.platform import quiet
from rlsys.runner.checkpoints import COMPLETE
from tests.runner.conftest import TRAIN_PROMPTS, loop_overrides
from tests.runner.test_grpo_end_to_end import read_event_scalars

STEPS = 3
# data/ counts are logged with the first record of each process, so a resumed run logs them again.
VOLATILE = ("time/", "throughput/", "sync/seconds", "data/")


def _train(model_dir: Path, files: tuple[Path, Path], output: Path, steps: int, **settings: object):
    from rlsys.runner.grpo import train

    overrides = loop_overrides(model_dir, files, output, **{
        "rollout.engine": "hf", "runner.total_steps": steps, "runner.save_interval": 1,
        "runner.keep_last_checkpoints": 2, **settings})
    return train(load_config("smollm2-135m-grpo-cpu", overrides))


def _by_step(history: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for entry in history:
        stable = {k: v for k, v in entry.items() if not k.startswith(VOLATILE)}
        steps.setdefault(int(entry["step"]), {}).update(stable)
    return steps


@pytest.mark.slow
def test_resumed_runs_equal_the_straight_run(tiny_model_dir, prompt_files, tmp_path, capsys):
    assert TRAIN_PROMPTS == 2 * 4, "the resume at step 2 must fall on the epoch boundary"
    straight = _by_step(_train(tiny_model_dir, prompt_files, tmp_path / "straight", STEPS,
                               **{"runner.save_interval": 0}).history)
    assert set(straight) == {0, 1, 2, 3}
    assert straight[1]["train/grad_norm"] > 0 and straight[1]["train/policy_loss"] != 0

    first = _train(tiny_model_dir, prompt_files, tmp_path / "resumed", 2)
    assert _by_step(first.history) == {s: straight[s] for s in (0, 1, 2)}

    # A copy whose step-2 save was cut short: no marker, a truncated file.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "resumed", interrupted)
    (interrupted / "checkpoints" / "step_00000002" / COMPLETE).unlink()
    largest = max((p for p in (interrupted / "checkpoints" / "step_00000002").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

    capsys.readouterr()
    second = _train(tiny_model_dir, prompt_files, tmp_path / "resumed", STEPS)
    assert second.resumed_from is not None and second.resumed_from.name == "step_00000002"
    # The console names the checkpoint and the position it continues from.
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_00000002"
    console = capsys.readouterr().err.splitlines()
    assert f"[rlsys] resumed from {checkpoint} (step 2, data epoch 1 offset 0)" in console
    assert _by_step(second.history) == {s: straight[s] for s in (3,)}
    # Loading a checkpoint raises deprecations inside megatron-core: filtered in the worker too.
    assert not quiet.filtered_lines((tmp_path / "resumed" / "logs" / "actor_rank_0.log").read_text())

    third = _train(tiny_model_dir, prompt_files, interrupted, STEPS)
    assert third.resumed_from is not None and third.resumed_from.name == "step_00000001"
    checkpoint = interrupted / "checkpoints" / "step_00000001"
    console = capsys.readouterr().err.splitlines()
    assert f"[rlsys] resumed from {checkpoint} (step 1, data epoch 0 offset 4)" in console
    assert _by_step(third.history) == {s: straight[s] for s in (2, 3)}

    # The event files of the resumed run hold each step once, with the straight run's values.
    resumed_events, straight_events = read_event_scalars(tmp_path / "resumed"), read_event_scalars(tmp_path / "straight")
    assert resumed_events["train/policy_loss"] == straight_events["train/policy_loss"]
    assert sorted(resumed_events["val/accuracy"]) == [0, 2, 3]  # every 2 steps, and after the last
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000002", "step_00000003"]  # runner.keep_last_checkpoints


def test_resume_dir_without_a_complete_checkpoint_is_an_error(tmp_path):
    from rlsys.runner.checkpoints import ResumeError, resume_point

    (tmp_path / "step_00000003").mkdir()
    with pytest.raises(ResumeError, match="runner.resume_dir: .*no COMPLETE marker"):
        resume_point(tmp_path / "elsewhere", True, str(tmp_path / "step_00000003"))
    with pytest.raises(ResumeError, match="does not exist"):
        resume_point(tmp_path, True, str(tmp_path / "missing"))
    assert resume_point(tmp_path, True, None) is None
    (tmp_path / "step_00000003" / COMPLETE).write_text("ok\n")
    assert resume_point(tmp_path, True, None) == tmp_path / "step_00000003"
    assert resume_point(tmp_path, False, None) is None
