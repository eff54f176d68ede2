"""The files of an rlsys checkpoint directory, without megatron (for the CLI's parent process).

Layout of one checkpoint directory (written by ``rlsys.actor.checkpoint``):

    <dir>/                      megatron ``dist_checkpointing`` files (torch_dist backend)
    <dir>/rlsys_checkpoint.json format version, parallel layout it was written at, dtype, contents
    <dir>/hf_files/             the HF side files: config.json, generation_config.json, tokenizer
                                files, chat template (everything of the HF directory except weights)

A directory of checkpoints has a ``latest`` file naming the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "rlsys_checkpoint.json"
HF_FILES_DIR = "hf_files"
FORMAT = "rlsys-megatron-checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, or does not fit the model."""


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def copy_hf_side_files(hf_dir: str | Path, destination: Path) -> None:
    """Every regular file of ``hf_dir`` except weights (configs, tokenizer, chat template)."""
    destination.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(hf_dir).iterdir()):
        if source.is_file() and not is_weight_file(source.name):
            shutil.copy2(source, destination / source.name)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an rlsys checkpoint ({METADATA_FILE} is missing)")
    metadata = json.loads(path.read_text())
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {metadata.get('format')!r} version {metadata.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return metadata


def load_hf_config(directory: str | Path) -> Any:
    """The HF config stored with a checkpoint."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(Path(directory) / HF_FILES_DIR)


def write_latest(root: str | Path, name: str) -> None:
    """Point ``root/latest`` at checkpoint ``name`` (atomic replace; call on one rank)."""
    root = Path(root)
    temporary = root / f".{LATEST_FILE}.tmp"
    temporary.write_text(name + "\n")
    os.replace(temporary, root / LATEST_FILE)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    directory = Path(root) / pointer.read_text().strip()
    read_metadata(directory)
    return directory


def params_dtype_from_metadata(metadata: dict[str, Any]) -> torch.dtype:
    return getattr(torch, metadata["params_dtype"])
