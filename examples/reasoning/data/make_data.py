"""Generates the example prompt files of this folder from the reasoning-gym package, offline and
deterministically: the same seed and package version give the same bytes.

    .venv/bin/python examples/reasoning/data/make_data.py            # rewrites the shipped files
    .venv/bin/python examples/reasoning/data/make_data.py --out-dir /tmp/data --seed 1

Choices
    * Output is the Boba format ``{"prompt": str, "solutions": [str]}`` plus a ``task`` key naming
      the difficulty tier, so accuracy can be split by tier; the data loader ignores extra keys.
    * Arithmetic is sized for SmolLM2-135M-Instruct, the CPU default. With only "put the answer in
      \\boxed{}" it almost never writes a box. Every prompt is therefore a one-line instruction,
      one worked example in Question/Answer form ending in "so the answer is \\boxed{13}.", and
      the question; the model then copies that form (it boxed all 32 validation 1-digit problems,
      greedy). Greedy accuracy is about half on 2-term 1-digit +/- and under a fifth on 2-term
      2-digit +/-/* and on 3-term 1-digit +/-, so the mix (tiers below) gives an early reward
      signal and room to improve. GSM prompts follow the same form with a word-problem example.
    * reasoning-gym draws 1-digit operands from 0..10 and 2-digit ones from 0..100, bounds
      included, and subtraction can go negative; problems are kept as generated.
    * Validation problems are unique and never appear in training. Training may repeat a problem:
      the 1-digit tier has only 242 distinct problems, and repetition is what several epochs
      would do anyway.
    * Each tier draws from its own reasoning-gym dataset seeded with ``seed * 1000 + tier number``;
      the tiers are then interleaved by a shuffle seeded with ``seed``.
    * GSM-style problems come from reasoning-gym's ``gsm_symbolic``; its closing "Give the result
      as your final answer. Do not include units." is dropped: the prefix asks for the same thing.
    * Answers are integers written plainly ("13", "-4"), or decimals without trailing zeros, so a
      boxed-answer checker compares like with like; any other form stops generation.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reasoning_gym

HERE = Path(__file__).resolve().parent
DEFAULT_SEED = 1

ARITHMETIC_PREFIX = (
    "Put the final answer in \\boxed{}.\n"
    "\n"
    "Question: Calculate 7 + 6.\n"
    "Answer: 7 + 6 = 13, so the answer is \\boxed{13}.\n"
    "\n"
    "Question: "
)
GSM_PREFIX = (
    "Solve the problem step by step and put the final answer, a number without units, in \\boxed{}.\n"
    "\n"
    "Question: Tom has 3 bags with 4 apples in each. He eats 2 apples. How many apples are left?\n"
    "Answer: 3 * 4 = 12 apples, and 12 - 2 = 10, so the answer is \\boxed{10}.\n"
    "\n"
    "Question: "
)
GSM_SUFFIX = " Give the result as your final answer. Do not include units."


@dataclass(frozen=True)
class ArithmeticTier:
    name: str
    num_train: int
    num_val: int
    config: dict[str, Any] = field(default_factory=dict)
    """reasoning-gym ``basic_arithmetic`` options."""


_PLAIN = {"allow_parentheses": False, "allow_negation": False, "format_style": "simple", "whitespace": "single"}
ARITHMETIC_TIERS = (
    ArithmeticTier(
        "add_sub_1digit",
        1000,
        32,
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+", "-"), **_PLAIN},
    ),
    ArithmeticTier(
        "add_sub_mul_2digit",
        800,
        24,
        {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2, "operators": ("+", "-", "*"), **_PLAIN},
    ),
    ArithmeticTier(
        "add_sub_1digit_3terms",
        200,
        8,
        {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": ("+", "-"), **_PLAIN},
    ),
)
GSM_TRAIN = 320
GSM_VAL = 64

Record = dict[str, Any]


def plain_number(answer: str) -> str:
    """``answer`` as a boxed-answer checker expects it: "13", "-4", "1687.5" (never "13.0")."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer))
    if re.fullmatch(r"-?\d+\.\d+", answer):
        whole, fraction = answer.split(".")
        fraction = fraction.rstrip("0")
        return f"{int(whole)}.{fraction}" if fraction else str(int(whole))
    raise ValueError(f"unexpected answer form {answer!r}")


def _items(name: str, seed: int, **config: Any) -> Iterator[dict[str, Any]]:
    """reasoning-gym items 0, 1, 2, ... of one dataset, for as long as they are asked for."""
    size = 100_000  # an upper bound: items are generated on access, so it costs nothing
    dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    for index in range(size):
        yield dataset[index]


def _take_val(items: Iterator[dict[str, Any]], count: int, val_questions: set[str]) -> list[dict]:
    """The next ``count`` items with questions not yet in ``val_questions``, which they join."""
    val = []
    for item in items:
        if item["question"] not in val_questions:
            val_questions.add(item["question"])
            val.append(item)
            if len(val) == count:
                break
    return val


def _take_train(items: Iterator[dict[str, Any]], count: int, val_questions: set[str]) -> list[dict]:
    """The next ``count`` items whose question is not a validation question (repeats allowed)."""
    train: list[dict] = []
    for item in items:
        if item["question"] not in val_questions:
            train.append(item)
            if len(train) == count:
                break
    return train


def arithmetic(seed: int) -> tuple[list[Record], list[Record]]:
    streams = [
        _items("basic_arithmetic", seed * 1000 + number, **tier.config) for number, tier in enumerate(ARITHMETIC_TIERS)
    ]
    # Validation is drawn from every tier before any training item: tiers overlap (a 2-digit
    # draw can be "1 - 8"), and no validation question may reach training through another tier.
    val_questions: set[str] = set()
    val_items = [_take_val(items, tier.num_val, val_questions) for tier, items in zip(ARITHMETIC_TIERS, streams)]
    train_items = [_take_train(items, tier.num_train, val_questions) for tier, items in zip(ARITHMETIC_TIERS, streams)]
    train: list[Record] = []
    val: list[Record] = []
    for tier, tier_train, tier_val in zip(ARITHMETIC_TIERS, train_items, val_items):
        train.extend(_arithmetic_record(item, tier.name) for item in tier_train)
        val.extend(_arithmetic_record(item, tier.name) for item in tier_val)
    random.Random(seed).shuffle(train)
    random.Random(seed).shuffle(val)
    return train, val


def _arithmetic_record(item: dict[str, Any], task: str) -> Record:
    return {"prompt": ARITHMETIC_PREFIX + item["question"], "solutions": [plain_number(item["answer"])], "task": task}


def gsm(seed: int) -> tuple[list[Record], list[Record]]:
    items = _items("gsm_symbolic", seed)
    val_questions: set[str] = set()
    val = _take_val(items, GSM_VAL, val_questions)
    train = _take_train(items, GSM_TRAIN, val_questions)
    return [_gsm_record(item) for item in train], [_gsm_record(item) for item in val]


def _gsm_record(item: dict[str, Any]) -> Record:
    question = item["question"].removesuffix(GSM_SUFFIX)
    return {"prompt": GSM_PREFIX + question, "solutions": [plain_number(item["answer"])], "task": "gsm_symbolic"}


def all_files(seed: int) -> dict[str, list[Record]]:
    """File name -> records, for every file this script writes."""
    arithmetic_train, arithmetic_val = arithmetic(seed)
    gsm_train, gsm_val = gsm(seed)
    return {
        "arithmetic_train.jsonl": arithmetic_train,
        "arithmetic_val.jsonl": arithmetic_val,
        "gsm_train.jsonl": gsm_train,
        "gsm_val.jsonl": gsm_val,
    }


def to_jsonl(records: list[Record]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write the files (default: this folder)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"generation seed (default: {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in all_files(args.seed).items():
        (args.out_dir / name).write_bytes(to_jsonl(records))
        print(f"{args.out_dir / name}: {len(records)} prompts")


if __name__ == "__main__":
    main()
