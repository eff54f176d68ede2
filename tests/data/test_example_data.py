"""The shipped example data: reproducible by its generator, loadable, and with correct plain answers."""

from __future__ import annotations

import ast
import collections
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.config import REPO_ROOT, DataConfig, load_config
from rlsys.data import load_train_prompts, load_val_prompts, read_jsonl

DATA_DIR = REPO_ROOT / "examples" / "reasoning" / "data"
SHIPPED = ["arithmetic_train.jsonl", "arithmetic_val.jsonl", "gsm_train.jsonl", "gsm_val.jsonl"]
PLAIN_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d*[1-9])?")


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines()]


def test_generator_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA_DIR / "make_data.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHIPPED)
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_cpu_config_names_the_arithmetic_files():
    data = load_config("smollm2-135m-grpo-cpu").data
    data.check_files_exist(REPO_ROOT)
    assert [Path(f).name for f in data.train_files + data.val_files] == SHIPPED[:2]


@pytest.mark.parametrize("name", SHIPPED)
def test_answers_are_plain_numbers(name):
    for example in read_jsonl(DATA_DIR / name):
        assert len(example.answers) == 1
        assert PLAIN_NUMBER.fullmatch(example.answers[0]), f"{example.location}: {example.answers[0]!r}"


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str) -> int:
    """Integer + - * expressions only; anything else fails the test."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected expression {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("name", SHIPPED[:2])
def test_arithmetic_answers_are_correct(name):
    for record in _records(name):
        question = record["prompt"].rsplit("Question: ", 1)[1]
        expression = re.fullmatch(r"Calculate (.+)\.", question).group(1)
        assert record["solutions"] == [str(_evaluate(expression))], question


@pytest.mark.parametrize("stem", ["arithmetic", "gsm"])
def test_validation_is_distinct_and_absent_from_training(stem):
    train = {r["prompt"] for r in _records(f"{stem}_train.jsonl")}
    val = [r["prompt"] for r in _records(f"{stem}_val.jsonl")]
    assert len(set(val)) == len(val)
    assert not train & set(val)


def test_arithmetic_tier_sizes():
    assert collections.Counter(r["task"] for r in _records("arithmetic_train.jsonl")) == {
        "add_sub_1digit": 1000,
        "add_sub_mul_2digit": 800,
        "add_sub_1digit_3terms": 200,
    }
    assert collections.Counter(r["task"] for r in _records("arithmetic_val.jsonl")) == {
        "add_sub_1digit": 32,
        "add_sub_mul_2digit": 24,
        "add_sub_1digit_3terms": 8,
    }


def test_every_prompt_fits_the_cpu_config(smollm2_tokenizer):
    config = DataConfig(
        train_files=[str(DATA_DIR / "arithmetic_train.jsonl"), str(DATA_DIR / "gsm_train.jsonl")],
        val_files=[str(DATA_DIR / "arithmetic_val.jsonl"), str(DATA_DIR / "gsm_val.jsonl")],
        max_prompt_length=load_config("smollm2-135m-grpo-cpu").data.max_prompt_length,
    )
    train = load_train_prompts(config, smollm2_tokenizer)
    val = load_val_prompts(config, smollm2_tokenizer)
    assert (len(train), train.num_dropped_overlong) == (2320, 0)
    assert (len(val), val.num_dropped_overlong) == (128, 0)


def test_shipped_files_are_small():
    assert sum((DATA_DIR / name).stat().st_size for name in SHIPPED) < 1_000_000


def test_sample_val_scores_samples_of_the_real_model_with_the_reward(tmp_path: Path) -> None:
    # Two problems the untrained model answers greedily right (9 + 5) and wrong (3 - 7, it drops
    # the sign): near-greedy sampling must find the first right and the second wrong.
    records = [json.loads(line) for line in (DATA_DIR / "arithmetic_val.jsonl").read_text().splitlines()]
    picked = [r for r in records if r["prompt"].endswith("Calculate 9 + 5.")]
    picked += [r for r in records if r["prompt"].endswith("Calculate 3 - 7.")]
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(json.dumps(r) + "\n" for r in picked))
    result = subprocess.run(
        [sys.executable, str(DATA_DIR / "sample_val.py"), "--val-file", str(val_file), "--samples", "2",
         "--temperature", "0.01", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert re.search(r"1 of 1\s+100.0%", rows["add_sub_1digit, positive"]), result.stdout
    assert re.search(r"0 of 1\s+0.0%", rows["add_sub_1digit, negative"]), result.stdout
    assert re.search(r"1 of 2\s+50.0%", rows["all"]), result.stdout
