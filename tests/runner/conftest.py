"""Shared by the loop tests: a tiny random Qwen2 with the real Qwen2.5 tokenizer, small prompt
files, and the config overrides that run the loop on it in seconds per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.models.offline import load_tokenizer
from tests.rollout.tiny_models import tiny_qwen2

TRAIN_PROMPTS = 8


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_tokenizer("qwen2.5-tokenizer")
    directory = tmp_path_factory.mktemp("tiny-qwen2-loop")
    tiny_qwen2(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("loop-data")
    train, val = directory / "train.jsonl", directory / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"What is {a} + {a + 1}?", "solutions": [str(2 * a + 1)]}) + "\n"
                             for a in range(TRAIN_PROMPTS)))
    val.write_text("".join(json.dumps({"prompt": f"What is {a} * 3?", "solutions": [str(3 * a)]}) + "\n"
                           for a in range(4)))
    return train, val


def loop_overrides(model_dir: Path, files: tuple[Path, Path], output_dir: Path, **settings: object) -> list[str]:
    """Overrides of the CPU default that train the tiny model; ``settings`` add or replace some."""
    values: dict[str, object] = {
        "model.path": str(model_dir),
        "data.train_files": f"[{files[0]}]",
        "data.val_files": f"[{files[1]}]",
        "data.max_prompt_length": 128,
        "reward.num_workers": 1,
        "reward.extra": "[{path: 'tests.runner.reward_terms:character_variety', weight: 2.0}]",
        "rollout.n_samples": 2,
        "rollout.max_new_tokens": 8,
        "runner.prompts_per_step": 4,
        "runner.total_steps": 2,
        "runner.val_interval": 2,
        "runner.val_max_prompts": 4,
        "runner.save_interval": 0,
        "runner.progress_bar": False,
        "runner.output_dir": str(output_dir),
        "actor.lr": 1e-3,
        "actor.precision": "fp32",
        "actor.max_tokens_per_microbatch": 512,
    }
    values.update(settings)
    return [f"{key}={value}" for key, value in values.items()]
