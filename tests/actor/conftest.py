"""Fixtures of the actor tests: tiny HF checkpoints with their HF reference log-probs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.actor.tiny import HF_CONFIGS, batch_tokens, hf_reference, make_hf_config


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per config: checkpoint dir and HF reference log-probs / entropies of the test batch."""
    from transformers import AutoModelForCausalLM

    prompts, responses = batch_tokens()
    checkpoints = {}
    for index, (name, settings) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(2000 + index)
        model = AutoModelForCausalLM.from_config(
            make_hf_config(settings), attn_implementation="eager", dtype=torch.float32
        )
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:
                    param.normal_(1.0, 0.3)
                elif param_name.endswith(".bias"):
                    param.normal_(0.0, 0.3)
        model.eval()
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, max_shard_size="100KB" if name == "qwen2_untied" else "1GB")
        checkpoints[name] = {"dir": str(directory), **hf_reference(model, prompts, responses)}
    return checkpoints


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("actor_work")
