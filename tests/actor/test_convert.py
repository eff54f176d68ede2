"""Risk: ``rlsys convert`` loses or alters weights, or leaves an HF directory transformers cannot use.

HF -> megatron distributed checkpoint at TP2xPP2 (4 processes, started by the convert function
itself) -> HF at TP1 (so the checkpoint is also resharded) must give back bitwise the same tensors
under the same names and dtypes, with no ``lm_head.weight`` for the tied model, the same config,
generation config and tokenizer files byte for byte, and a directory ``transformers`` loads as is
with bitwise the original logits. The source has a tokenizer (Qwen2.5's, from the offline cache),
and the output is written in several safetensors shards so the index path is exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.actor.tiny import VOCAB

CONFIG_NAME = "qwen2_tied"


@pytest.fixture(scope="module")
def source_dir(tiny_checkpoints: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tied Qwen2 with Qwen2.5's tokenizer files and a generation config beside it."""
    from transformers import GenerationConfig

    from rlsys.models.offline import resolve_model_path

    directory = tmp_path_factory.mktemp("convert_source")
    shutil.copytree(tiny_checkpoints[CONFIG_NAME]["dir"], directory, dirs_exist_ok=True)
    tokenizer_dir = resolve_model_path("qwen2.5-tokenizer")
    for file in tokenizer_dir.iterdir():
        if file.is_file() and file.name != "rlsys_offline.json":
            shutil.copy2(file, directory / file.name)
    GenerationConfig(eos_token_id=[7, 8], pad_token_id=7, do_sample=True, temperature=0.7).save_pretrained(directory)
    return directory


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_round_trip_through_tp2_pp2_is_bitwise(source_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsys.actor.checkpoint_files import is_weight_file, read_metadata
    from rlsys.actor.convert import convert_hf_to_mcore, convert_mcore_to_hf

    mcore_dir = convert_hf_to_mcore(source_dir, tmp_path / "mcore", tp=2, pp=2)
    metadata = read_metadata(mcore_dir)
    assert (metadata["tp"], metadata["pp"], metadata["contents"]) == (2, 2, ["model"])
    hf_dir = convert_mcore_to_hf(mcore_dir, tmp_path / "hf", max_shard_bytes=60_000)

    original, restored = _tensors(source_dir), _tensors(hf_dir)
    assert "lm_head.weight" not in restored
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    weight_files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    assert len(weight_files) > 1, "expected several shards"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(original) and set(index["weight_map"].values()) == set(weight_files)

    side_files = [file for file in source_dir.iterdir() if file.is_file() and not is_weight_file(file.name)]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        file.name for file in side_files
    }
    for file in side_files:
        assert (hf_dir / file.name).read_bytes() == file.read_bytes(), file.name

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source_dir, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert AutoTokenizer.from_pretrained(hf_dir)("1 + 1 = 2")["input_ids"] == AutoTokenizer.from_pretrained(
        source_dir
    )("1 + 1 = 2")["input_ids"]


def test_convert_refuses_a_non_empty_output(source_dir: Path, tmp_path: Path) -> None:
    from rlsys.actor.convert import convert_hf_to_mcore

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("do not overwrite")
    with pytest.raises(FileExistsError):
        convert_hf_to_mcore(source_dir, tmp_path / "taken", tp=1, pp=1)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "do not overwrite"
