"""Risk: ``rlsys eval`` evaluates the wrong checkpoint, converts it wrongly, or converts it every time.

One real rlsys checkpoint is made from the tiny HF model with ``convert_hf_to_mcore`` and laid
out as training lays it out (``checkpoints/step_00000002/actor/`` with a ``COMPLETE`` marker).
Every way of naming it finds it; greedy evaluation of it must give exactly the responses of the
HF model it came from (the conversion back is bitwise); a second evaluation reuses the
conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlsys.actor.checkpoint_files import METADATA_FILE, CheckpointError
from rlsys.cli import main
from rlsys.eval.model import CONVERTED_DIR, find_checkpoint, locate_model

EVAL_OPTIONS = ["--limit", "3", "--max-new-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def checkpoints_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlsys.actor.convert import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("run") / "checkpoints"
    convert_hf_to_mcore(tiny_model_dir, root / "step_00000002" / "actor")
    (root / "step_00000002" / "COMPLETE").touch()
    (root / "step_00000004").mkdir()  # a newer save that never completed
    return root


def test_every_way_of_naming_the_checkpoint_finds_it(checkpoints_root: Path, tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    actor = checkpoints_root / "step_00000002" / "actor"
    assert find_checkpoint(actor) == actor
    assert find_checkpoint(actor.parent) == actor
    assert find_checkpoint(checkpoints_root) == actor  # newest complete step
    assert find_checkpoint(tiny_model_dir) is None
    source = locate_model(str(checkpoints_root))
    assert source.checkpoint == actor.resolve() and source.hf_path is None
    assert (source.tokenizer_path / "tokenizer_config.json").is_file()

    # A 'latest' file decides over the newest complete step.
    other = tmp_path / "checkpoints"
    shutil.copytree(checkpoints_root, other)
    (other / "step_00000002").rename(other / "step_00000001")
    (other / "latest").write_text("step_00000001\n")
    assert find_checkpoint(other) == other / "step_00000001" / "actor"
    (other / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="latest: names 'step_00000009'"):
        find_checkpoint(other)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / METADATA_FILE).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(CheckpointError, match="something-else"):
        find_checkpoint(foreign)


def test_checkpoint_evaluates_like_the_model_it_came_from(checkpoints_root: Path, tiny_model_dir: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def evaluate(model: Path, output: Path) -> tuple[list[str], str]:
        assert main(["eval", "smollm2-135m-grpo-cpu", "reward.num_workers=1", "--model", str(model),
                     *EVAL_OPTIONS, "--output", str(output)]) == 0
        lines = (output / "arithmetic_val.jsonl").read_text().splitlines()
        return [json.loads(line)["response"] for line in lines], capsys.readouterr().out

    reference, _ = evaluate(tiny_model_dir, tmp_path / "hf")
    responses, out = evaluate(checkpoints_root, tmp_path / "ckpt")
    assert responses == reference
    actor = checkpoints_root.resolve() / "step_00000002" / "actor"
    assert f"converting rlsys checkpoint {actor} to an HF model in" in out
    converted = list((tmp_path / "ckpt" / CONVERTED_DIR).iterdir())
    assert [path.name.rsplit("-", 1)[0] for path in converted] == ["step_00000002-actor"]
    summary = json.loads((tmp_path / "ckpt" / "summary.json").read_text())
    assert summary["model"]["checkpoint"] == str(actor)
    assert summary["model"]["hf_path"] == str(converted[0])

    again, out = evaluate(checkpoints_root / "step_00000002", tmp_path / "ckpt")
    assert again == reference
    assert "using the HF conversion of checkpoint" in out and "converting" not in out
