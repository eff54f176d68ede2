"""Shared fixtures of the evaluation tests: a tiny random Qwen2 with SmolLM2's real tokenizer and
chat template (fast to generate with, and small enough to convert to a Megatron checkpoint in
seconds), a reward pool, and a JSONL writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rlsys.config import RewardConfig
from rlsys.models.offline import load_tokenizer
from rlsys.reward.pool import RewardPool
from tests.rollout.tiny_models import tiny_qwen2


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A random 2-layer Qwen2 over SmolLM2's 49k-token vocabulary, saved with the tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-eval-model")
    tiny_qwen2(smollm2_tokenizer, seed=0).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pool() -> Iterator[RewardPool]:
    with RewardPool(RewardConfig(num_workers=1)) as reward_pool:
        yield reward_pool


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Writes lines (dicts JSON-encoded, strings verbatim) to ``tmp_path/name``."""

    def write(lines: list[Any], name: str) -> Path:
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return path

    return write
