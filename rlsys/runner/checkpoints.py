"""Run checkpoints: what one holds, when it counts, which one a run resumes from.

Layout under ``<runner.output_dir>/checkpoints``:

    step_00000004/actor/            the Megatron checkpoint of every rank (model, optimizer, lr schedule)
    step_00000004/rng/rank_*.pt     each rank's python / numpy / torch generator states
    step_00000004/trainer.json      step, data position (epoch, offset), the config it ran with
    step_00000004/trainer_rng.pt    the driver's generator states
    step_00000004/COMPLETE          written last, atomically: the checkpoint counts only with it

What must stay true:
- A directory without ``COMPLETE`` is never resumed from, whatever else it holds (a run killed
  mid-save leaves one; resuming takes the newest complete checkpoint before it, and the next save
  of that step replaces it).
- Old checkpoints are deleted only after a newer one is complete, so a crash at any moment leaves
  at least one complete checkpoint once the first save finished.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy
import torch

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
TRAINER_RNG = "trainer_rng.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class ResumeError(RuntimeError):
    """``runner.resume_dir`` does not name a complete checkpoint."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resume_point(root: Path, resume: bool, resume_dir: str | None) -> Path | None:
    """The checkpoint to resume from: ``resume_dir`` (a checkpoint, or a directory of them: its
    newest complete one), else with ``resume`` the newest complete one under ``root``, else None."""
    if resume_dir:
        path = Path(resume_dir)
        if (path / COMPLETE).is_file():
            return path
        newest = complete_checkpoints(path)
        if newest:
            return newest[-1][1]
        reason = "has no COMPLETE marker (its save did not finish)" if path.is_dir() else "does not exist"
        raise ResumeError(f"runner.resume_dir: {path} {reason} and holds no complete step_* checkpoint")
    if resume:
        newest = complete_checkpoints(root)
        return newest[-1][1] if newest else None
    return None


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    _atomic_write(directory / TRAINER_STATE, json.dumps(state, indent=1, sort_keys=True).encode())
    torch.save({"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()},
               directory / TRAINER_RNG)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    rng = torch.load(directory / TRAINER_RNG, weights_only=False)
    random.setstate(rng["python"])
    numpy.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((directory / TRAINER_STATE).read_text())


def mark_complete(directory: Path) -> None:
    """The last write of a save (see the top)."""
    _atomic_write(directory / COMPLETE, b"ok\n")


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, and unfinished saves older than
    the newest complete one."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    newest_step = complete[-1][0]
    for _, directory in complete[:-keep_last]:
        shutil.rmtree(directory, ignore_errors=True)
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and int(match.group(1)) < newest_step and not (child / COMPLETE).exists():
            shutil.rmtree(child, ignore_errors=True)


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
