"""Risk: a run resumes from a checkpoint whose files changed after its save (truncated, a flipped
bit, a file deleted) and trains on garbage or crashes deep inside megatron; it starts afresh over
damaged checkpoints and loses them; a disk that fills during a save leaves no usable checkpoint,
or the run hangs or dies without saying which directory and which OS error; pruning deletes the
only good checkpoint.

The run-level tests go through the real ``rlsys train`` command line with the tiny model. The
full disk is real: the run's processes get a file size limit (``RLIMIT_FSIZE``, with SIGXFSZ
ignored, so writes fail with EFBIG) below the size of a checkpoint's data files, as a disk that
fills in the middle of the save refuses the rest of it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from rlsys.runner.checkpoints import (
    COMPLETE,
    TRAINER_STATE,
    CheckpointSaveError,
    ResumeError,
    mark_complete,
    prune,
    resume_point,
    saving,
    step_dir,
    verify,
)
from tests.runner.conftest import loop_overrides
from tests.runner.test_interrupt import wait_gone

# ------------------------------------------------------------------ helpers


def _fake_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    """A checkpoint directory of real files (a large one in a subdirectory, like megatron's)."""
    directory = step_dir(root, step)
    (directory / "actor").mkdir(parents=True)
    (directory / "actor" / "__0_0.distcp").write_bytes(os.urandom(3 << 20))
    (directory / "actor" / "common.pt").write_bytes(os.urandom(500))
    (directory / TRAINER_STATE).write_text(json.dumps({"step": step}))
    if complete:
        mark_complete(directory)
    return directory


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: Path) -> int:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return size


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ------------------------------------------------------------------ the manifest, on real files


def test_manifest_records_every_file_and_verify_names_the_one_that_changed(tmp_path):
    directory = _fake_checkpoint(tmp_path, 1)
    manifest = json.loads((directory / COMPLETE).read_text())
    assert manifest["hash"] == "sha256"
    assert sorted(manifest["files"]) == ["actor/__0_0.distcp", "actor/common.pt", TRAINER_STATE]
    for name, entry in manifest["files"].items():
        content = (directory / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert not list(directory.glob(".*"))  # the marker's temporary file is gone
    assert verify(directory) is None

    big = directory / "actor" / "__0_0.distcp"
    original = big.read_bytes()
    _flip_byte(big)
    assert verify(directory).startswith(f"{big}: contents differ from the save (sha256 ")
    big.write_bytes(original)
    assert verify(directory) is None
    size = _truncate(big)
    assert verify(directory) == f"{big}: {size // 2} bytes, {size} when saved"
    big.write_bytes(original)
    (directory / "actor" / "common.pt").unlink()
    assert verify(directory) == f"{directory / 'actor' / 'common.pt'}: missing (listed in the manifest, 500 bytes)"

    (directory / COMPLETE).write_text('{"hash": "sha256", "fi')  # a marker damaged after its atomic write
    assert verify(directory) == f"{directory / COMPLETE}: not a readable file manifest"
    (directory / COMPLETE).write_text("ok\n")  # saved before checkpoints carried a manifest
    assert verify(directory) is None


def test_resume_takes_the_newest_intact_checkpoint_and_never_starts_afresh_over_damaged_ones(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    first, second, third = (_fake_checkpoint(root, step) for step in (1, 2, 3))
    _fake_checkpoint(root, 4, complete=False)  # an unfinished save: not even a candidate
    _flip_byte(third / "actor" / "__0_0.distcp")
    capsys.readouterr()
    assert resume_point(root, True, None) == second
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(
        f"[rlsys] warning: skipping checkpoint {third}: {third / 'actor' / '__0_0.distcp'}: contents differ")

    # A checkpoint named by runner.resume_dir must itself be intact; a directory of them gives its newest intact.
    with pytest.raises(ResumeError, match=f"runner.resume_dir: {third} is damaged: {third}/actor/__0_0.distcp"):
        resume_point(tmp_path / "elsewhere", True, str(third))
    assert resume_point(tmp_path / "elsewhere", True, str(root)) == second

    (second / TRAINER_STATE).unlink()
    _truncate(first / "actor" / "__0_0.distcp")
    with pytest.raises(ResumeError, match=f"every complete checkpoint under {root} is damaged.*None was deleted"):
        resume_point(root, True, None)
    lines = capsys.readouterr().err
    assert f"{second / TRAINER_STATE}: missing" in lines and f"{first / 'actor' / '__0_0.distcp'}: " in lines
    assert _steps(root) == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]
    assert resume_point(root, False, None) is None  # runner.resume=false asks for no checkpoint


def test_pruning_counts_back_from_the_checkpoint_just_saved(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 5):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 4, complete=False)
    _fake_checkpoint(root, 6, complete=False)

    # A run that resumed from step 1 (2, 3, 5 damaged, say) and just saved step 2 again: steps
    # after it are another line's, left for the run to replace when it gets there.
    prune(root, 1, saved=step_dir(root, 2))
    assert _steps(root) == ["step_00000002", "step_00000003", "step_00000004", "step_00000005", "step_00000006"]
    prune(root, 1, saved=step_dir(root, 4))  # not complete: deletes nothing
    assert _steps(root) == ["step_00000002", "step_00000003", "step_00000004", "step_00000005", "step_00000006"]
    prune(root, 2, saved=step_dir(root, 5))
    assert _steps(root) == ["step_00000003", "step_00000005", "step_00000006"]
    prune(root, 1)  # default: from the newest complete one, which is always kept
    assert _steps(root) == ["step_00000005", "step_00000006"]
    prune(root, 1)
    assert _steps(root) == ["step_00000005", "step_00000006"]


def _in_a_process_with_a_file_size_limit(code: str, limit: int) -> subprocess.CompletedProcess[str]:
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, preexec_fn=limited, cwd=Path(__file__).parents[2])


def test_a_failed_save_is_removed_and_names_the_os_error_even_when_the_writer_dropped_it(tmp_path):
    root = tmp_path / "checkpoints"
    previous = _fake_checkpoint(root, 1)
    code = f"""
        import torch
        from pathlib import Path
        from rlsys.runner.checkpoints import saving
        directory = Path({str(root)!r}) / "step_00000002"
        with saving(directory):
            (directory / "actor").mkdir()
            try:  # into an open file, as torch.distributed.checkpoint writes
                with open(directory / "actor" / "model.pt", "wb") as stream:
                    torch.save(torch.zeros(1 << 20), stream)  # 4 MiB
            except RuntimeError as exc:  # torch's "unexpected pos", the OSError as its context
                error = exc
            if HOW == "dropped":  # as megatron's writer processes send it back: the message only
                raise RuntimeError("Worker failure: " + str(error))
            raise error
        """
    for how in ("chained", "dropped"):
        result = _in_a_process_with_a_file_size_limit(code.replace("HOW", repr(how)), 1 << 20)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{CheckpointSaveError.__module__}.CheckpointSaveError: saving checkpoint "
                               f"{root / 'step_00000002'} failed: [Errno 27] File too large"), result.stderr
        assert last.endswith(f"the partial save was removed and the newest complete checkpoint, {previous}, is kept")
        assert ("(allocating " in last) == (how == "dropped")  # found again by allocating where it was lost
        assert _steps(root) == ["step_00000001"] and verify(previous) is None

    # Without an OS error behind it, a failure stays what it was (and the partial save still goes).
    with pytest.raises(ZeroDivisionError), saving(step_dir(root, 2)):
        (step_dir(root, 2) / "trainer.json").write_text("{}")
        1 / 0
    assert _steps(root) == ["step_00000001"]


# ------------------------------------------------------------------ through `rlsys train`

STEP_FILES = ("actor/__0_0.distcp", "actor/__0_1.distcp", "actor/common.pt")


def _train(overrides: list[str], *, file_size_limit: int | None = None,
           mark: str = "") -> tuple[int, list[str], float]:
    """``rlsys train`` on the CPU default with ``overrides``: exit status, stderr lines, and the
    seconds from the last console step line to the exit. Its processes carry ``mark``."""
    env, limited = {**os.environ, "RLSYS_TEST_RUN": mark}, None
    if file_size_limit is not None:
        # Ray's raylet maps its object store as one file at start and its children restore
        # SIGXFSZ's default action: the store must fit under the limit.
        env["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"] = str(96 << 20)

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    process = subprocess.Popen([sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", *overrides],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=limited)
    lines, last_step_at = [], time.monotonic()
    for line in process.stderr:  # a run that hangs ends at pytest's timeout
        lines.append(line.rstrip("\n"))
        if line.startswith("[rlsys] step "):
            last_step_at = time.monotonic()
    returncode = process.wait(timeout=60)
    return returncode, lines, time.monotonic() - last_step_at


def _step_line(lines: list[str], step: int) -> str:
    """The console line of ``step`` without its timings."""
    [line] = [line for line in lines if line.startswith(f"[rlsys] step {step}: ")]
    return re.sub(r" time/\S+", "", line)


@pytest.mark.slow
def test_a_run_skips_damaged_checkpoints_naming_the_file_and_survives_a_full_disk(tiny_model_dir, prompt_files,
                                                                                   tmp_path):
    output = tmp_path / "run"
    root = output / "checkpoints"

    def overrides(steps: int, **settings: object) -> list[str]:
        return loop_overrides(tiny_model_dir, prompt_files, output, **{
            "rollout.engine": "hf", "runner.total_steps": steps, "runner.save_interval": 1,
            "runner.keep_last_checkpoints": 3, "runner.val_interval": 0, **settings})

    code, lines, _ = _train(overrides(3))
    assert code == 0, "\n".join(lines[-40:])
    straight_step_2 = _step_line(lines, 2)
    assert _steps(root) == ["step_00000001", "step_00000002", "step_00000003"]
    first, second, third = (step_dir(root, step) for step in (1, 2, 3))
    assert all(verify(directory) is None for directory in (first, second, third))
    data_file = third / STEP_FILES[0]

    # A disk that fills during the next save (its data files are 156 MB; the limit 128 MiB is above
    # every other file of the run: sync buckets 64 MB, the object store 96 MiB). The SGLang engine
    # (the CPU default's) takes weights through shared-memory buckets; the HF engine's would need a
    # Ray object larger than the limit.
    assert data_file.stat().st_size > 128 << 20
    mark = uuid.uuid4().hex
    code, lines, exit_s = _train(overrides(4, **{"rollout.engine": "sglang"}), file_size_limit=128 << 20, mark=mark)
    assert code == 1, "\n".join(lines[-40:])
    assert f"[rlsys] resumed from {third} (step 3, data epoch 1 offset 4)" in lines
    errors = [line for line in lines if line.startswith("rlsys train: error: ")]
    assert len(errors) == 1, "\n".join(lines[-40:])
    assert not any(line.startswith("Traceback") for line in lines), "\n".join(lines[-40:])  # a fault, not a bug
    assert errors[0].startswith(f"rlsys train: error: step 4 failed in checkpoint: saving checkpoint "
                                f"{step_dir(root, 4)} failed: [Errno 27] File too large")
    assert errors[0].endswith(f"the partial save was removed and the newest complete checkpoint, {third}, is kept; "
                              f"last complete checkpoint: {third} (a rerun with the same runner.output_dir "
                              "resumes from it)")
    assert f"rlsys train: the workers' full logs are in {output / 'logs'}/" in lines
    assert exit_s < 120, f"{exit_s:.0f} s from the failed step to the exit"
    assert wait_gone(mark) == []  # Ray, the engine and the actor went with it
    assert _steps(root) == ["step_00000001", "step_00000002", "step_00000003"]
    assert all(verify(directory) is None for directory in (first, second, third))

    # Damage every checkpoint, each its own way: with none intact the run stops before starting
    # any worker, names each file, and deletes nothing.
    _flip_byte(data_file)
    truncated = second / STEP_FILES[1]
    size = _truncate(truncated)
    deleted = first / STEP_FILES[2]
    kept_aside = tmp_path / "common.pt"
    shutil.move(deleted, kept_aside)
    code, lines, _ = _train(overrides(4))
    assert code == 2, "\n".join(lines[-40:])
    warnings = [line for line in lines if line.startswith("[rlsys] warning: skipping checkpoint")]
    assert len(warnings) == 3, "\n".join(lines[-40:])
    assert warnings[0].startswith(f"[rlsys] warning: skipping checkpoint {third}: {data_file}: contents differ")
    assert warnings[1] == f"[rlsys] warning: skipping checkpoint {second}: {truncated}: {size // 2} bytes, " \
                          f"{size} when saved"
    assert warnings[2].startswith(f"[rlsys] warning: skipping checkpoint {first}: {deleted}: missing")
    assert any(line.startswith(f"rlsys train: error: every complete checkpoint under {root} is damaged")
               for line in lines), "\n".join(lines[-40:])
    assert not any("workers up" in line for line in lines)
    assert _steps(root) == ["step_00000001", "step_00000002", "step_00000003"]

    # With the oldest one whole again, the run resumes from it, saves step 2 anew, and leaves
    # the damaged step 3 (a later step) for when it gets there.
    shutil.move(kept_aside, deleted)
    code, lines, _ = _train(overrides(2))
    assert code == 0, "\n".join(lines[-40:])
    assert sum(line.startswith("[rlsys] warning: skipping checkpoint") for line in lines) == 2
    assert f"[rlsys] resumed from {first} (step 1, data epoch 0 offset 4)" in lines
    assert _step_line(lines, 2) == straight_step_2  # the state of step 1 came back whole
    assert verify(second) is None and json.loads((second / TRAINER_STATE).read_text())["step"] == 2
    assert verify(first) is None and verify(third) is not None
