"""Fixtures of the actor tests: tiny HF checkpoints with their HF reference log-probs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.actor.tiny import HF_CONFIGS, batch_tokens, hf_reference
from tests.tiny_configs import make_randomised_model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per config: checkpoint dir and HF reference log-probs / entropies of the test batch."""
    prompts, responses = batch_tokens()
    checkpoints = {}
    for index, (name, settings) in enumerate(HF_CONFIGS.items()):
        model = make_randomised_model(settings, seed=2000 + index)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, max_shard_size="100KB" if name == "qwen2_untied" else "1GB")
        checkpoints[name] = {"dir": str(directory), **hf_reference(model, prompts, responses)}
    return checkpoints


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("actor_work")
