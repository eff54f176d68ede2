"""Run checkpoints: what one holds, when it counts, which one a run resumes from.

Layout under ``<runner.output_dir>/checkpoints``:

    step_00000004/actor/            the Megatron checkpoint of every rank (model, optimizer, lr schedule)
    step_00000004/rng/rank_*.pt     each rank's python / numpy / torch generator states
    step_00000004/trainer.json      step, data position (epoch, offset), the config it ran with
    step_00000004/trainer_rng.pt    the driver's generator states
    step_00000004/COMPLETE          written last, atomically: the checkpoint counts only with it; the
                                    manifest of every other file (size and SHA-256)

What must stay true:
- A directory without ``COMPLETE`` is never resumed from, whatever else it holds (a run killed
  mid-save leaves one; resuming takes the newest complete checkpoint before it, and the next save
  of that step replaces it).
- ``COMPLETE`` is written after every other file is on disk (fsynced, with its directory), by
  tmp file + rename + fsync, so a crash leaves either no marker or the whole manifest.
- Resuming checks the chosen checkpoint against its manifest (sizes, then hashes): one whose files
  changed since the save (truncated, bit-flipped, deleted) is skipped with a warning naming the
  file, and the next older complete one is tried. When every complete one fails, the run stops
  with ``ResumeError`` instead of starting afresh over them: nothing is lost or overwritten.
- Old checkpoints are deleted only after a newer one is complete, so a crash at any moment leaves
  at least one complete checkpoint once the first save finished. Pruning counts back from the
  checkpoint just saved and never touches newer steps (left by a run line that resumed from an
  older one), so what it keeps always includes a checkpoint verified at its save.
- A save that fails (disk full, quota, permissions) is removed, which gives back its space, and
  ends the run with ``CheckpointSaveError`` naming the directory and the OS error; the previous
  complete checkpoint is untouched.

SHA-256 (hashlib's, OpenSSL with the CPU's SHA extensions): about 0.8 s per GB on one core, twice
a plain copy of the same files from the page cache; on the CPU default's 2.2 GB checkpoint (135M
parameters, AdamW state) 1.2 s to hash and fsync at the save, against about 20 s for the save
itself, and 1.2 s to verify at resume. CRC32 would take a third of that but is 32 bits; SHA-256
is as fast as SHA-1 and BLAKE2b here, and ``sha256sum`` checks a manifest by hand.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy
import torch

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
TRAINER_RNG = "trainer_rng.pt"
HASH = "sha256"
MANIFEST_FORMAT = "rlsys-checkpoint-manifest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEGACY_MARKER = b"ok\n"


class ResumeError(RuntimeError):
    """No checkpoint to resume from where one is needed: ``runner.resume_dir`` names none that is
    complete and intact, or every complete checkpoint of the run fails its manifest."""


class CheckpointSaveError(RuntimeError):
    """A save failed with an OS error (disk full, quota, permissions); the previous checkpoint is kept."""


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
    newest intact one), else with ``resume`` the newest intact one under ``root``, else None.

    Intact: complete, and every file as its manifest recorded (``verify``). A named checkpoint that
    is not intact is an error; among several, each one that is not is skipped with a warning."""
    if resume_dir:
        path = Path(resume_dir)
        if (path / COMPLETE).is_file():
            problem = verify(path)
            if problem is not None:
                raise ResumeError(f"runner.resume_dir: {path} is damaged: {problem}")
            return path
        candidates = complete_checkpoints(path)
        if candidates:
            return _newest_intact(candidates, "runner.resume_dir: ")
        reason = "has no COMPLETE marker (its save did not finish)" if path.is_dir() else "does not exist"
        raise ResumeError(f"runner.resume_dir: {path} {reason} and holds no complete step_* checkpoint")
    if resume:
        candidates = complete_checkpoints(root)
        return _newest_intact(candidates, "") if candidates else None
    return None


def _newest_intact(candidates: list[tuple[int, Path]], context: str) -> Path:
    from rlsys.runner.metrics import console

    for _, directory in reversed(candidates):
        problem = verify(directory)
        if problem is None:
            return directory
        console(f"warning: skipping checkpoint {directory}: {problem}")
    root = candidates[-1][1].parent
    raise ResumeError(
        f"{context}every complete checkpoint under {root} is damaged (each one's fault is printed above). "
        "None was deleted or overwritten: to start afresh, set runner.output_dir to a new directory; "
        "to continue from a copy elsewhere, set runner.resume_dir")


def verify(directory: Path) -> str | None:
    """None when every file the manifest in ``directory/COMPLETE`` lists has its recorded size and
    hash; otherwise the first difference, naming the file. Sizes are checked before any hashing
    (a truncated or missing file is found without reading the rest)."""
    marker = directory / COMPLETE
    try:
        content = marker.read_bytes()
    except OSError as exc:
        return f"{marker}: cannot be read ({exc.strerror})"
    if content == _LEGACY_MARKER:
        return None  # saved before checkpoints carried a manifest: nothing to check against
    try:
        manifest = json.loads(content)
        algorithm, files = manifest["hash"], manifest["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        digests = {name: str(entry[algorithm]) for name, entry in files.items()}
        hashlib.new(algorithm)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{marker}: not a readable file manifest"
    for name in sorted(files):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing (listed in the manifest, {sizes[name]} bytes)"
        if size != sizes[name]:
            return f"{path}: {size} bytes, {sizes[name]} when saved"
    found = _hash_files(directory, sorted(files), algorithm)
    for name in sorted(files):
        if found[name] != digests[name]:
            return f"{directory / name}: contents differ from the save ({algorithm} {found[name][:16]}..., " \
                   f"recorded {digests[name][:16]}...)"
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
    """The last write of a save (see the top): fsync every file while hashing it, and the
    directories, then the manifest as ``COMPLETE``."""
    marker_files = {COMPLETE, f".{COMPLETE}.tmp"}
    names = sorted(name for name in (path.relative_to(directory).as_posix() for path in directory.rglob("*")
                                     if path.is_file()) if name not in marker_files)
    digests = _hash_files(directory, names, HASH, fsync=True)
    files = {name: {"size": (directory / name).stat().st_size, HASH: digests[name]} for name in names}
    for sub in sorted({(directory / name).parent for name in names}, key=lambda p: -len(p.parts)):
        _fsync_directory(sub)
    manifest = {"format": MANIFEST_FORMAT, "hash": HASH, "files": files}
    _atomic_write(directory / COMPLETE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    _fsync_directory(directory)
    _fsync_directory(directory.parent)


@contextmanager
def saving(directory: Path) -> Iterator[None]:
    """Around one save into ``directory`` (see the top): an unfinished save of the same step (by a
    killed run) is replaced; a failed save is removed, and an OS error behind it becomes
    ``CheckpointSaveError``.

    The OS error is the one in the exception chain, or, where the writer dropped it (megatron's
    writer processes send back only the message of torch's "unexpected pos" error, and a Ray task
    error carries no chained exceptions), the one that allocating a file a little larger than
    the save's largest under ``directory`` raises now: a full disk, a quota or a file size limit
    refuses it the same way."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    try:
        yield
    except BaseException as exc:
        cause = (_os_error(exc) or _allocation_error(directory)) if isinstance(exc, Exception) else None
        shutil.rmtree(directory, ignore_errors=True)
        if cause is None:
            raise
        kept = complete_checkpoints(directory.parent)
        previous = f"the newest complete checkpoint, {kept[-1][1]}, is kept" if kept else \
            "there is no complete checkpoint yet"
        raise CheckpointSaveError(f"saving checkpoint {directory} failed: {cause}; the partial save was "
                                  f"removed and {previous}") from exc


def prune(root: Path, keep_last: int, saved: Path | None = None) -> None:
    """Keep ``saved`` (the checkpoint just completed; default: the newest complete one) and the
    ``keep_last - 1`` complete ones before it; delete older complete checkpoints and unfinished
    saves older than ``saved``. Steps after ``saved`` are left alone (see the top)."""
    complete = complete_checkpoints(root)
    if saved is None:
        if not complete:
            return
        saved = complete[-1][1]
    match = _STEP_DIR.match(saved.name)
    if match is None or not (saved / COMPLETE).is_file():
        return
    saved_step = int(match.group(1))
    older = [directory for step, directory in complete if step < saved_step]
    for directory in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(directory, ignore_errors=True)
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and int(match.group(1)) < saved_step and not (child / COMPLETE).exists():
            shutil.rmtree(child, ignore_errors=True)


def _hash_files(directory: Path, names: list[str], algorithm: str, *, fsync: bool = False) -> dict[str, str]:
    """``{name: hex digest}``; files in parallel threads (hashlib releases the GIL on large updates)."""

    def digest(name: str) -> str:
        # file_digest reads into one reused 256 KiB buffer: reading large chunks instead left each
        # save's freed chunks with the allocator, and a long run's driver grew ~32 MiB per save.
        with open(directory / name, "rb") as handle:
            hasher = hashlib.file_digest(handle, algorithm)
            if fsync:
                os.fsync(handle.fileno())
        return hasher.hexdigest()

    workers = max(1, min(len(names), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(digest, names)))


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc``: itself, its cause or context, a Ray task error's cause, or
    one of torch.distributed.checkpoint's per-rank failures."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if isinstance(current, tuple) and current:
            current = current[0]  # torch's (exception, traceback) pairs
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError (itself dual-typed)
        if isinstance(current, OSError) and current.errno is not None and not isinstance(cause, BaseException):
            return current
        failures = getattr(current, "failures", None)  # torch CheckpointException: {rank: error}
        pending += [cause, current.__cause__, current.__context__,
                    *(failures.values() if isinstance(failures, dict) else ())]
    return None


def _allocation_error(directory: Path) -> OSError | None:
    """The error of allocating 1 MiB more than the largest file under ``directory``, or None."""
    if not directory.is_dir():
        return None
    size = max((path.stat().st_size for path in directory.rglob("*") if path.is_file()), default=0) + (1 << 20)
    probe = directory / ".space_probe"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, size)
        finally:
            os.close(descriptor)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None  # says nothing about the save
        return OSError(exc.errno, f"{os.strerror(exc.errno)} (allocating {size} bytes in {directory} after "
                                  "the save failed)")
    finally:
        probe.unlink(missing_ok=True)
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
