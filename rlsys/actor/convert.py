"""``rlsys convert``: HF directory <-> megatron distributed checkpoint, each in one call.

    convert_hf_to_mcore(hf_path, output, tp, pp)   # starts tp * pp processes itself
    convert_mcore_to_hf(mcore_path, output)         # starts one process (tp = pp = 1 by default)

Choices and what must stay true:
- Conversion runs on the CPU with gloo (``rlsys.actor.launch``) on any host: it only moves
  tensors, and each rank holds one (TP, PP) shard, so the processes together hold one model.
- hf-to-mcore: every rank builds its ``GPTModel`` stage with the local layer spec (its
  checkpoint keys are the Transformer Engine spec's too) and parameters in the dtype of the HF
  safetensors, fills it with ``load_hf_into_megatron`` (THE mapping in
  ``rlsys.models.weight_mapping``) and saves it with ``rlsys.actor.checkpoint.save_checkpoint``
  (model only) plus the HF side files: config, generation config, tokenizer files, chat
  template. The result is what ``MegatronActor.load_checkpoint`` reads.
- mcore-to-hf: builds the model at (tp, pp), loads the checkpoint (megatron reshards whatever
  layout it was written at) and streams ``iter_hf_weights`` (the same mapping, inverted); rank 0
  writes safetensors files of at most ``max_shard_bytes`` (with ``model.safetensors.index.json``
  when there are several) and copies the side files back, so ``transformers`` loads the
  directory as it is.
- Same dtype both ways and pure copies / concatenations in the mapping: HF -> megatron -> HF
  gives bitwise the same tensors, and checkpoints of tied models hold no ``lm_head.weight``.
- An output directory must not exist yet or be empty (nothing is overwritten).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlsys.actor.launch import run_on_cpu_processes

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _require_empty_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty directory")


def hf_checkpoint_dtype(hf_dir: str | Path) -> torch.dtype:
    """The one floating dtype of an HF safetensors checkpoint (read from headers, not data)."""
    from safetensors import safe_open

    dtypes = set()
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            dtypes.update(handle.get_slice(name).get_dtype() for name in handle.keys())
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"{hf_dir}: expected one floating dtype among {sorted(_SAFETENSORS_DTYPES)}, found {sorted(dtypes)}"
        )
    return _SAFETENSORS_DTYPES[dtypes.pop()]


def convert_hf_to_mcore(hf_path: str | Path, output: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Write the HF checkpoint in ``hf_path`` as a megatron distributed checkpoint at (tp, pp)."""
    hf_path, output = Path(hf_path).resolve(), Path(output).resolve()
    _require_empty_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    run_on_cpu_processes(_hf_to_mcore_rank, tp * pp, args=(str(hf_path), str(output), tp, pp))
    return output


def convert_mcore_to_hf(
    mcore_path: str | Path, output: str | Path, tp: int = 1, pp: int = 1, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write the model of a megatron checkpoint (an actor's or a converted one) as an HF directory."""
    mcore_path, output = Path(mcore_path).resolve(), Path(output).resolve()
    from rlsys.actor.checkpoint_files import read_metadata

    read_metadata(mcore_path)
    _require_empty_output(output)
    run_on_cpu_processes(_mcore_to_hf_rank, tp * pp, args=(str(mcore_path), str(output), tp, pp, max_shard_bytes))
    return output


def _hf_to_mcore_rank(hf_path: str, output: str, tp: int, pp: int) -> None:
    from transformers import AutoConfig

    from rlsys.actor.checkpoint import save_checkpoint
    from rlsys.actor.parallel import initialize_parallel
    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import load_hf_into_megatron

    initialize_parallel(tp, pp, seed=0)
    hf_config = AutoConfig.from_pretrained(hf_path)
    model = build_gpt_model(hf_config, transformer_impl="local", params_dtype=hf_checkpoint_dtype(hf_path))
    load_hf_into_megatron(model, hf_path, hf_config)
    save_checkpoint(
        output, model, hf_config=hf_config, hf_side_files=hf_path, extra_metadata={"converted_from": hf_path}
    )


def _mcore_to_hf_rank(mcore_path: str, output: str, tp: int, pp: int, max_shard_bytes: int) -> None:
    from rlsys.actor.checkpoint import load_checkpoint
    from rlsys.actor.checkpoint_files import (
        HF_FILES_DIR,
        copy_hf_side_files,
        load_hf_config,
        params_dtype_from_metadata,
        read_metadata,
    )
    from rlsys.actor.parallel import initialize_parallel
    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import iter_hf_weights

    initialize_parallel(tp, pp, seed=0)
    hf_config = load_hf_config(mcore_path)
    dtype = params_dtype_from_metadata(read_metadata(mcore_path))
    model = build_gpt_model(hf_config, transformer_impl="local", params_dtype=dtype)
    load_checkpoint(mcore_path, model)
    writer = SafetensorsShardWriter(Path(output), max_shard_bytes) if dist.get_rank() == 0 else None
    for name, tensor in iter_hf_weights(model, hf_config):
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.finish()
        copy_hf_side_files(Path(mcore_path) / HF_FILES_DIR, Path(output))
    dist.barrier()


class SafetensorsShardWriter:
    """Streams ``(name, tensor)`` pairs into HF-style safetensors shards of at most ``max_shard_bytes``."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Own storage per tensor: safetensors refuses tensors that share memory (views of one
        # gathered tensor, e.g. gate and up halves), and yielded tensors may alias parameters.
        self._pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            self._written[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map: dict[str, Any] = {}
        for number, (path, names) in enumerate(self._written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
