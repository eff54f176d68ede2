"""Fixtures shared by the rollout tests: one tiny checkpoint (see ``tiny_models.py``), its HF
reference engine, eight chat-templated prompts and HF's greedy responses, each built once per
session."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from rlsys.models.offline import load_tokenizer
from rlsys.rollout.base import Sample
from rlsys.rollout.hf_engine import HFEngine
from tests.rollout.tiny_models import GREEDY, chat_prompts, make_eos_replace, tiny_qwen2


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("qwen2.5-tokenizer")


@pytest.fixture(scope="session")
def prompt_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return chat_prompts(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase,
                   prompt_ids: list[list[int]]) -> Path:
    """The checkpoint, with EOS made to replace the 4th greedy token of prompt 0 (and that token
    wherever else it would be the greedy choice)."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    model = tiny_qwen2(tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    first = HFEngine(directory).generate(prompt_ids[:1], GREEDY, return_logprobs=False)[0]
    make_eos_replace(model, token=first.response_ids[3], eos=tokenizer.eos_token_id)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_greedy(hf_engine: HFEngine, prompt_ids: list[list[int]]) -> list[Sample]:
    """HF's greedy responses; checked to contain both finish reasons, so that the comparisons
    against them cover both."""
    samples = hf_engine.generate(prompt_ids, GREEDY)
    reasons = {sample.finish_reason for sample in samples}
    assert reasons == {"stop", "length"}, f"greedy finish reasons of the test model: {reasons}"
    return samples
