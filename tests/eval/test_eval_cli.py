"""Risk: ``rlsys eval`` does not run from a clean checkout, writes outputs that disagree with each other,
mishandles several benchmarks or their keys, or fails on bad input without naming what is wrong.

- The CPU default (SmolLM2-135M-Instruct, offline) on the shipped validation data, through the
  console entry point, as a user runs it: every output file, counts, pass@k recomputed from the
  per-example lines.
- Several benchmarks in one call on a tiny random model: MATH-style keys detected, a GPQA-style
  letter benchmark recognised as multiple choice, a prompt template applied.
- Bad input: each error exits 2 and names the file and line, the option or the field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rlsys.cli import main
from rlsys.eval.inputs import detect_keys
from rlsys.eval.metrics import pass_at_k

REPO = Path(__file__).resolve().parents[2]
VAL_FILE = "examples/reasoning/data/arithmetic_val.jsonl"
RECORD_KEYS = {"prompt_id", "sample_index", "location", "prompt", "response", "extracted_answer", "references",
               "reward", "correct", "finish_reason", "response_length", "reward_status", "reward_error"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cpu_default_on_the_shipped_validation_data(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rlsys", "eval", "smollm2-135m-grpo-cpu", "reward.num_workers=1",
               "--limit", "3", "--n", "2", "--temperature", "0.7", "--max-new-tokens", "24", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arithmetic_val.jsonl", "report.md", "results.md",
                                                         "summary.json"]

    lines = _lines(tmp_path / "arithmetic_val.jsonl")
    assert len(lines) == 3 * 2
    assert all(set(line) == RECORD_KEYS for line in lines)
    assert [(line["prompt_id"], line["sample_index"]) for line in lines] == [(p, s) for p in range(3) for s in range(2)]
    assert [line["location"] for line in lines[::2]] == [f"{REPO / VAL_FILE}:{i}" for i in range(1, 4)]
    expected_answers = [json.loads(line)["solutions"] for line in (REPO / VAL_FILE).read_text().splitlines()[:3]]
    assert [line["references"] for line in lines[::2]] == expected_answers
    assert all(line["prompt"].startswith("<|im_start|>") for line in lines)  # the chat template was applied
    assert all(line["correct"] == (line["reward"] == 5.0) for line in lines)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["model"] == "smollm2-135m-instruct" and summary["model"]["engine"] == "hf"
    assert summary["settings"]["n"] == 2 and summary["settings"]["temperature"] == 0.7
    bench = summary["benchmarks"]["arithmetic_val"]
    assert (bench["num_prompts"], bench["n"], bench["num_samples"]) == (3, 2, 6)
    assert (bench["prompt_key"], bench["answer_key"], bench["answer_type"]) == ("prompt", "solutions", "math")
    correct = [sum(line["correct"] for line in lines if line["prompt_id"] == p) for p in range(3)]
    assert bench["accuracy"] == pytest.approx(sum(correct) / 6)
    for k in (1, 2):
        assert bench[f"pass@{k}"] == pytest.approx(sum(pass_at_k(2, c, k) for c in correct) / 3)
    ended = sum(line["finish_reason"] == "stop" for line in lines)
    assert bench["fraction_properly_ended"] == pytest.approx(ended / 6)
    assert bench["num_timeout"] == bench["num_crash"] == 0

    table = (tmp_path / "results.md").read_text()
    assert f"| arithmetic_val | math | 3 | 2 | {100 * bench['accuracy']:.1f} |" in table
    report = (tmp_path / "report.md").read_text()
    assert "## arithmetic_val" in report and "### Wrong answers" in report
    assert "[rlsys eval] arithmetic_val: 3 problems x 2" in result.stdout and table in result.stdout
    assert "arithmetic_val:" not in result.stderr  # no progress bar when stderr is not a terminal


def test_several_benchmarks_in_one_call(tiny_model_dir: Path, write_jsonl: Callable[..., Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    math_file = write_jsonl([{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1}
                             for i in range(3)], "math500.jsonl")
    choice_file = write_jsonl([
        {"prompt": "Which is a noble gas? (A) O (B) Ne (C) N (D) H", "solutions": ["B"]},
        {"prompt": "Which is largest? (A) 2 (B) 3 (C) 9 (D) 5", "solutions": "(C)"},
    ], "diamond.jsonl")
    output = tmp_path / "out"
    code = main(["eval", "smollm2-135m-grpo-cpu", "reward.num_workers=1", "--model", str(tiny_model_dir),
                 "--benchmarks", str(math_file), f"gpqa={choice_file}", "--n", "2", "--temperature", "1.0",
                 "--max-new-tokens", "4", "--prompt-template", "boxed", "--output", str(output)])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["math500", "gpqa"]
    math500, gpqa = summary["benchmarks"]["math500"], summary["benchmarks"]["gpqa"]
    assert (math500["prompt_key"], math500["answer_key"], math500["answer_type"]) == ("problem", "answer", "math")
    assert (gpqa["prompt_key"], gpqa["answer_key"], gpqa["answer_type"]) == ("prompt", "solutions", "choice")
    assert (math500["num_samples"], gpqa["num_samples"]) == (6, 4)
    assert summary["settings"]["prompt_template"] == "boxed"

    math_lines, gpqa_lines = _lines(output / "math500.jsonl"), _lines(output / "gpqa.jsonl")
    assert [line["references"] for line in math_lines[::2]] == [["0"], ["2"], ["4"]]
    assert [line["references"] for line in gpqa_lines[::2]] == [["B"], ["(C)"]]
    assert all("What is" in line["prompt"] and "Please reason step by step" in line["prompt"] for line in math_lines)
    # Choice records hold the letter found (or None), and a letter is right only if it is the reference's.
    for line in gpqa_lines:
        assert line["extracted_answer"] in (None, *"ABCDEFGHIJ")
        assert line["correct"] == (line["extracted_answer"] == line["references"][0].strip("()"))

    table = (output / "results.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| math500", "| gpqa"]
    report = (output / "report.md").read_text()
    assert report.index("## math500") < report.index("## gpqa")
    assert "converting" not in capsys.readouterr().out


def test_keys_explicit_win_else_detected(write_jsonl: Callable[..., Path]) -> None:
    both = write_jsonl([{"question": "q", "prompt": "p", "answer": "1", "solution": "s \\boxed{1}"}], "both.jsonl")
    detect = dict(default_prompt_key="prompt", default_answer_key="solutions")
    assert detect_keys(both, prompt_key=None, answer_key=None, **detect) == ("prompt", "answer")
    assert detect_keys(both, prompt_key="question", answer_key="solution", **detect) == ("question", "solution")
    assert detect_keys(both, prompt_key=None, answer_key=None, default_prompt_key="question",
                       default_answer_key="solution") == ("question", "solution")


def _eval(capsys: pytest.CaptureFixture[str], model: Path, *options: str) -> tuple[int, str]:
    code = main(["eval", "smollm2-135m-grpo-cpu", "--model", str(model), *options])
    return code, capsys.readouterr().err


def test_bad_files_and_keys_name_the_file_and_line(tiny_model_dir: Path, write_jsonl: Callable[..., Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = write_jsonl([{"prompt": "What is 1 + 1?", "solutions": ["2"]}], "good.jsonl")
    broken = write_jsonl([{"prompt": "What is 1 + 1?", "solutions": ["2"]}, '{"prompt": "What is', ], "broken.jsonl")
    empty_answer = write_jsonl([{"prompt": "a", "solutions": ["1"]}, {"prompt": "b", "solutions": []}], "empty.jsonl")

    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(broken))
    assert code == 2 and f"{broken}:2: invalid JSON" in err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), str(empty_answer))
    assert code == 2 and f"{empty_answer}:2: 'solutions' is an empty list" in err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), "--answer-key", "gold")
    assert code == 2 and f"{good}:1: missing key 'gold'" in err
    missing = good.parent / "nope.jsonl"
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), str(missing))
    assert code == 2 and f"--benchmarks {missing}: no such file" in err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), "--answer-type", "choice")
    assert code == 2 and "--answer-type" in err and f"{good}:1" in err and "'2'" in err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), "--answer-type", "math", "choice")
    assert code == 2 and "--answer-type: give one type for all benchmarks or one per benchmark (1), got 2" in err
    twin = good.parent / "twin" / "good.jsonl"
    twin.parent.mkdir()
    twin.write_text(good.read_text())
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), str(twin))
    assert code == 2 and "named 'good'; name them with NAME=FILE" in err


def test_bad_options_and_models_name_the_option(tiny_model_dir: Path, write_jsonl: Callable[..., Path],
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = write_jsonl([{"prompt": "What is 1 + 1?", "solutions": ["2"]}], "good.jsonl")
    for option, value, message in [("--n", "0", "argument --n: must be >= 1, got 0"),
                                   ("--top-p", "0", "argument --top-p: must be in (0, 1], got 0"),
                                   ("--temperature", "-1", "argument --temperature: must be >= 0"),
                                   ("--max-new-tokens", "many", "argument --max-new-tokens: must be an integer"),
                                   ("--engine", "vllm", "argument --engine: invalid choice")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(tiny_model_dir), "--benchmarks", str(good), option, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), "--n", "2", "--k", "1", "4")
    assert code == 2 and "--k: pass@4 needs 1 <= k <= n (n=2" in err
    code, err = _eval(capsys, tiny_model_dir, "--benchmarks", str(good), "--prompt-template", "Solve it")
    assert code == 2 and "--prompt-template: 'Solve it' is neither a preset" in err
    code, err = _eval(capsys, tmp_path / "no-such-model", "--benchmarks", str(good))
    assert code == 2 and f"--model: '{tmp_path / 'no-such-model'}' is neither an existing directory" in err
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    code, err = _eval(capsys, not_a_model, "--benchmarks", str(good))
    assert code == 2 and f"--model: {not_a_model} is neither an HF model directory (no config.json)" in err
    code = main(["eval", "smollm2-135m-grpo-cpu", "data.val_files=[missing/val.jsonl]", "--model", str(tiny_model_dir)])
    assert code == 2 and "data.val_files[0]: no such file" in capsys.readouterr().err
