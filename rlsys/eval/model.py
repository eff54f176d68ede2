"""The model ``rlsys eval`` evaluates: an HF directory, an offline model name, or an rlsys checkpoint.

Choices:
- An rlsys checkpoint is recognised by its ``rlsys_checkpoint.json``, in the given directory
  itself or in its ``actor/`` subdirectory (a training step directory ``step_XXXXXXXX/``). A
  directory of checkpoints (a run's ``checkpoints/`` root) stands for the one its ``latest``
  file names, or, without that file, for its newest complete training step
  (``rlsys.runner.checkpoints.complete_checkpoints``). Anything else is an HF directory or an
  offline model name (``rlsys.models.offline.resolve_model_path``).
- A checkpoint is converted with ``convert_mcore_to_hf`` into
  ``<output>/converted/<name>-<hash>/``, where the hash covers the checkpoint's resolved path and
  the size and modification time of its metadata file (training replaces a checkpoint of the
  same name in place). The conversion is written beside its target and renamed into place, so
  a directory that exists is complete and is reused by the next evaluation of the same
  checkpoint.
- The tokenizer comes from the HF directory, or from the checkpoint's ``hf_files/`` (the side
  files it was saved with), so benchmark files are read and checked before any conversion or
  engine start.
- Engines: ``hf`` (transformers ``generate``; bf16 on a GPU, fp32 on the CPU) or ``sglang`` (the
  rollout engine in its worker process, with sglang's defaults on a GPU and
  ``rlsys.platform.sglang_cpu``'s on the CPU), on CUDA when there is a GPU. Evaluation needs no
  log-probs, so the HF engine is asked not to recompute them (a second forward pass). One
  generate call of a long-answer benchmark (e.g. 32 problems x 16 samples x 32k tokens) can take
  far longer than a training rollout, so SGLang's per-call timeout is ``SGLANG_CALL_TIMEOUT_S``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlsys.actor.checkpoint_files import HF_FILES_DIR, LATEST_FILE, METADATA_FILE, CheckpointError, read_metadata
from rlsys.models.offline import OfflineModelError, resolve_model_path
from rlsys.rollout.base import Sample, SamplingParams

ENGINES = ("hf", "sglang")
SGLANG_CALL_TIMEOUT_S = 6 * 3600.0
"""Limit of one SGLang generate call: a hung engine still fails, a long benchmark batch does not."""
CONVERTED_DIR = "converted"


@dataclass(frozen=True)
class ModelSource:
    """Where the model and its tokenizer are."""

    given: str
    """The model as the user named it."""
    hf_path: Path | None
    """The HF directory to load; None for a checkpoint not converted yet."""
    checkpoint: Path | None
    """The rlsys checkpoint directory, when the model is one."""

    @property
    def tokenizer_path(self) -> Path:
        return self.hf_path if self.hf_path is not None else self.checkpoint / HF_FILES_DIR

    def describe(self) -> dict[str, Any]:
        return {"model": self.given, "hf_path": str(self.hf_path) if self.hf_path else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def find_checkpoint(path: str | Path) -> Path | None:
    """The rlsys checkpoint ``path`` designates (see the module docstring), or None when it is not one.

    Raises ``CheckpointError`` for a ``latest`` file naming something that is not a checkpoint, or
    for a checkpoint of an unknown format.
    """
    from rlsys.runner.checkpoints import complete_checkpoints

    path = Path(path)
    found = _checkpoint_in(path)
    if found is None and (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        found = _checkpoint_in(path / name) if name else None
        if found is None:
            raise CheckpointError(f"{path / LATEST_FILE}: names {name!r}, which is not an rlsys checkpoint "
                                  f"(no {METADATA_FILE} in {path / name} or its actor/)")
    if found is None:
        steps = complete_checkpoints(path)
        if steps:
            found = _checkpoint_in(steps[-1][1])
            if found is None:
                raise CheckpointError(f"{steps[-1][1]}: the newest complete step has no {METADATA_FILE} "
                                      "in its actor/")
    if found is not None:
        read_metadata(found)
    return found


def _checkpoint_in(directory: Path) -> Path | None:
    for candidate in (directory, directory / "actor"):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    return None


def locate_model(model: str) -> ModelSource:
    """The model source of ``--model``: a checkpoint, an HF directory or an offline name.

    Raises ``OfflineModelError`` when it is none of them (a directory without ``config.json``
    that is no checkpoint either, or an unknown name).
    """
    path = Path(model).expanduser()
    checkpoint = find_checkpoint(path) if path.is_dir() else None
    if checkpoint is not None:
        return ModelSource(model, None, checkpoint.resolve())
    hf_path = resolve_model_path(model)
    if not (hf_path / "config.json").is_file():
        raise OfflineModelError(f"{hf_path} is neither an HF model directory (no config.json) nor an rlsys "
                                f"checkpoint (no {METADATA_FILE} in it, its actor/, or a checkpoint its "
                                f"{LATEST_FILE} file names)")
    return ModelSource(model, hf_path, None)


def converted_path(checkpoint: Path, output_dir: Path) -> Path:
    """Where the HF conversion of ``checkpoint`` goes (see the module docstring)."""
    metadata = (checkpoint / METADATA_FILE).stat()
    key = f"{checkpoint.resolve()}:{metadata.st_size}:{metadata.st_mtime_ns}"
    label = f"{checkpoint.parent.name}-{checkpoint.name}" if checkpoint.name == "actor" else checkpoint.name
    return output_dir / CONVERTED_DIR / f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def ensure_hf_model(source: ModelSource, output_dir: Path, log: Callable[[str], None] = print) -> ModelSource:
    """``source`` with an HF directory: a checkpoint is converted (or its earlier conversion reused)."""
    if source.checkpoint is None:
        return source
    from rlsys.actor.convert import convert_mcore_to_hf

    target = converted_path(source.checkpoint, output_dir)
    if target.is_dir():
        log(f"using the HF conversion of checkpoint {source.checkpoint} made earlier: {target}")
    else:
        log(f"converting rlsys checkpoint {source.checkpoint} to an HF model in {target}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        convert_mcore_to_hf(source.checkpoint, partial)
        partial.rename(target)
    return ModelSource(source.given, target, source.checkpoint)


class _HFWithoutLogprobs:
    """The HF engine, told to skip the log-prob pass that evaluation does not use."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Sample]:
        return self.engine.generate(prompt_ids, params, return_logprobs=False)

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_engine(kind: str, model_path: Path, *, seed: int) -> Any:
    """A started engine with ``generate`` and ``shutdown``; ``kind`` is ``hf`` or ``sglang``."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "hf":
        from rlsys.rollout.hf_engine import HFEngine

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return _HFWithoutLogprobs(HFEngine(model_path, dtype=dtype, device=device))
    if kind == "sglang":
        from rlsys.rollout.sglang_engine import SGLangEngine

        return SGLangEngine(model_path, device=device, seed=seed, timeout_s=SGLANG_CALL_TIMEOUT_S)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
