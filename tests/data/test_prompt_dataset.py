"""Rendering prompts with the real offline tokenizers, overlong prompts, and the config loaders."""

from __future__ import annotations

import re

import pytest

from rlsys.config import DataConfig
from rlsys.data import DataError, load_prompts, load_train_prompts, load_val_prompts
from rlsys.models.offline import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 12 + 30?"},
]


def _reference(tokenizer, messages):
    """What the tokenizer itself renders and tokenises for a conversation."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    return text, tuple(ids)


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "qwen_tokenizer"])
def test_chat_template_matches_the_tokenizers_own(request, write_jsonl, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    path = write_jsonl(
        [
            {"prompt": "What is 12 + 30?", "solutions": ["42"]},
            {"prompt": MESSAGES, "solutions": ["42"]},
        ]
    )
    plain = load_prompts([path], tokenizer)
    with_system = load_prompts([path], tokenizer, system_prompt="You add numbers.")

    user_only = [MESSAGES[1]]
    assert (plain[0].text, plain[0].token_ids) == _reference(tokenizer, user_only)
    assert (with_system[0].text, with_system[0].token_ids) == _reference(tokenizer, MESSAGES)
    # A message-list prompt is used as written; system_prompt applies to string prompts only.
    assert (plain[1].text, plain[1].token_ids) == _reference(tokenizer, MESSAGES)
    assert (with_system[1].text, with_system[1].token_ids) == _reference(tokenizer, MESSAGES)
    assert plain[0].text.endswith("<|im_start|>assistant\n")
    assert plain[0].answers == ("42",)
    assert plain[0].location == f"{path}:1"


def test_system_prompt_replaces_the_default_one(qwen_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "Hi", "solutions": ["x"]}])
    [default] = load_prompts([path], qwen_tokenizer)
    [custom] = load_prompts([path], qwen_tokenizer, system_prompt="Think first.")
    assert default.text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert custom.text == (
        "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_without_chat_template_the_prompt_is_tokenised_as_written(smollm2_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "Calculate 7 + 6.", "solutions": ["13"]}])
    [prompt] = load_prompts([path], smollm2_tokenizer, apply_chat_template=False, system_prompt="ignored")
    assert prompt.text == "Calculate 7 + 6."
    assert prompt.token_ids == tuple(smollm2_tokenizer("Calculate 7 + 6.")["input_ids"])


def test_message_prompts_need_the_chat_template(smollm2_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "fine", "solutions": ["1"]}, {"prompt": MESSAGES, "solutions": ["42"]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*apply_chat_template=true"):
        load_prompts([path], smollm2_tokenizer, apply_chat_template=False)


def test_a_tokenizer_without_chat_template_is_an_error(write_jsonl):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = None
    path = write_jsonl([{"prompt": "Hi", "solutions": ["x"]}])
    with pytest.raises(DataError, match="^tokenizer .* has no chat template"):
        load_prompts([path], tokenizer)


def test_overlong_prompts_are_dropped_and_counted(smollm2_tokenizer, write_jsonl):
    # Digits are single tokens for SmolLM2, so prompt length grows with the number of digits.
    lengths = [5, 60, 10, 80, 3, 61]
    path = write_jsonl([{"prompt": "7" * n, "solutions": ["1"]} for n in lengths])
    every = load_prompts([path], smollm2_tokenizer, apply_chat_template=False, max_prompt_length=100)
    assert [len(p.token_ids) for p in every] == lengths
    assert every.num_dropped_overlong == 0

    kept = load_prompts([path], smollm2_tokenizer, apply_chat_template=False, max_prompt_length=60)
    assert kept.num_dropped_overlong == 2
    assert [p.location for p in kept] == [f"{path}:{line}" for line in (1, 2, 3, 5)]
    assert [p.index for p in kept] == [0, 1, 2, 3]
    assert max(len(p.token_ids) for p in kept) == 60


def test_config_loaders_keep_file_order_and_concatenate_files(smollm2_tokenizer, write_jsonl, tmp_path):
    write_jsonl([{"q": f"{i} + 1?", "a": str(i + 1)} for i in range(5)], name="train.jsonl")
    write_jsonl([{"q": f"{i} * 2?", "a": str(2 * i)} for i in range(3)], name="val_a.jsonl")
    write_jsonl([{"q": "9 * 9?", "a": "81"}], name="val_b.jsonl")
    config = DataConfig(
        train_files=["train.jsonl"],
        val_files=["val_a.jsonl", "val_b.jsonl"],
        prompt_key="q",
        answer_key="a",
        apply_chat_template=False,
    )
    train = load_train_prompts(config, smollm2_tokenizer, base=tmp_path)
    val = load_val_prompts(config, smollm2_tokenizer, base=tmp_path)
    assert [p.text for p in train] == [f"{i} + 1?" for i in range(5)]
    assert [p.answers[0] for p in val] == ["0", "2", "4", "81"]
    assert [len(batch) for batch in val.batches(3)] == [3, 1]
    assert [p for batch in val.batches(3) for p in batch] == list(val)


def test_train_split_without_prompts_is_an_error(smollm2_tokenizer, write_jsonl, tmp_path):
    write_jsonl([{"prompt": "1234567890", "solutions": ["1"]}], name="long.jsonl")
    config = DataConfig(train_files=["long.jsonl"], val_files=[], apply_chat_template=False, max_prompt_length=5)
    with pytest.raises(DataError, match=r"data.train_files: no prompts .*1 longer than data.max_prompt_length=5"):
        load_train_prompts(config, smollm2_tokenizer, base=tmp_path)
    assert len(load_val_prompts(config, smollm2_tokenizer, base=tmp_path)) == 0
