"""Prompt templates: braces in math prompts survive, a misspelt preset fails naming the field, and
``data.prompt_template`` reaches the rendered prompt through the config loaders, before the chat template."""

from __future__ import annotations

import re

import pytest

from rlsys.config import ConfigError, load_config
from rlsys.data import DataError, load_prompts, load_train_prompts, load_val_prompts
from rlsys.data.templates import PRESETS, apply_template, resolve_template

MATH_PROMPT = r"Simplify $\frac{x^{2}}{x}$ for $x \in \{1, 2\}$; the set {prompt} is literal."


def test_presets_ask_for_a_boxed_answer():
    r1_zero = resolve_template("r1_zero")
    assert r1_zero.startswith("A conversation between User and Assistant.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1_zero
    assert "\\boxed{}" in r1_zero
    assert apply_template(r1_zero, "What is 2 + 2?").endswith("\nUser: What is 2 + 2?\nAssistant: <think>")
    assert apply_template(resolve_template("boxed"), "What is 2 + 2?") == (
        "What is 2 + 2?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_braces_in_the_prompt_and_template_are_kept():
    # str.format would fail on the LaTeX braces or substitute the literal {prompt} inside the prompt.
    assert apply_template(PRESETS["boxed"], MATH_PROMPT).startswith(MATH_PROMPT + "\nPlease reason")
    assert apply_template("Q: {prompt} A: \\boxed{}", MATH_PROMPT) == f"Q: {MATH_PROMPT} A: \\boxed{{}}"


def test_a_custom_template_is_used_as_written():
    assert resolve_template("Problem: {prompt}\nSolution:") == "Problem: {prompt}\nSolution:"


@pytest.mark.parametrize("value", ["r1-zero", "Boxed", "Please answer in \\boxed{}.", ""])
def test_neither_preset_nor_placeholder_names_the_field(value):
    with pytest.raises(ConfigError, match=r"^data\.prompt_template: .*boxed, r1_zero.*\{prompt\}"):
        resolve_template(value)


def test_template_wraps_plain_prompts(smollm2_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": MATH_PROMPT, "solutions": ["x"]}])
    [prompt] = load_prompts([path], smollm2_tokenizer, apply_chat_template=False, prompt_template="r1_zero")
    expected = apply_template(PRESETS["r1_zero"], MATH_PROMPT)
    assert prompt.text == expected
    assert prompt.token_ids == tuple(smollm2_tokenizer(expected)["input_ids"])


def test_templated_text_becomes_the_user_message(qwen_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "What is 12 + 30?", "solutions": ["42"]}])
    [prompt] = load_prompts([path], qwen_tokenizer, prompt_template="boxed", system_prompt="Be brief.")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": apply_template(PRESETS["boxed"], "What is 12 + 30?")},
    ]
    assert prompt.text == qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 12 + 30?\nPlease reason step by step" in prompt.text


def test_a_template_with_message_prompts_is_an_error(qwen_tokenizer, write_jsonl):
    messages = [{"role": "user", "content": "Hi"}]
    path = write_jsonl([{"prompt": "fine", "solutions": ["1"]}, {"prompt": messages, "solutions": ["1"]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: data\.prompt_template .*chat messages"):
        load_prompts([path], qwen_tokenizer, prompt_template="boxed")


def test_a_bad_template_fails_before_any_file_is_read(smollm2_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.prompt_template: 'r1zero'"):
        load_prompts([tmp_path / "missing.jsonl"], smollm2_tokenizer, prompt_template="r1zero")


def test_the_r1zero_experiment_renders_math_problems_with_its_template(qwen_tokenizer, write_jsonl, tmp_path):
    # The shipped seed recipe, with the offline Qwen2.5 tokenizer standing in for its model directory's.
    write_jsonl([{"problem": MATH_PROMPT, "answer": "x"}], name="train.jsonl")
    write_jsonl([{"problem": "What is 1 + 1?", "answer": "2"}], name="val.jsonl")
    run = load_config(
        "qwen2.5-math-1.5b-grpo-r1zero",
        ["data.train_files=[train.jsonl]", "data.val_files=[val.jsonl]"],
    )
    [train] = load_train_prompts(run.data, qwen_tokenizer, base=tmp_path)
    [val] = load_val_prompts(run.data, qwen_tokenizer, base=tmp_path)
    assert train.text == apply_template(PRESETS["r1_zero"], MATH_PROMPT)
    assert val.text.endswith("User: What is 1 + 1?\nAssistant: <think>")
    assert (train.answers, val.answers) == (("x",), ("2",))
