"""Risk: the output files disagree with the results, or model text breaks the markdown.

Records come from the real pool scoring written responses (right, wrong, unanswered, one full
of backticks); the files are read back and compared with the results they were written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.data.dataset import Prompt
from rlsys.eval.benchmark import BenchmarkResult, score_samples, summarize
from rlsys.eval.report import write_results
from rlsys.rollout.base import Sample

RESPONSES = {
    0: ["7 + 6 = 13, so \\boxed{13}.", "The sum is \\boxed{12}.", "It is thirteen."],
    1: ["```python\nprint(2 + 2)\n```\n```` nested ````\nso \\boxed{4}", "\\boxed{5}", "Long " * 400 + "\\boxed{3}"],
}


def _result(pool, name: str) -> BenchmarkResult:
    prompts = [Prompt(0, "What is 7 + 6?", (1,), ("13",), "math.jsonl:1"),
               Prompt(1, "What is 2 + 2?", (1,), ("4",), "math.jsonl:2")]
    samples = [Sample(p, [0] * (i + 5), text, [], "stop" if i < 2 else "length")
               for p, texts in RESPONSES.items() for i, text in enumerate(texts)]
    records = score_samples(samples, prompts, pool, "math")
    return BenchmarkResult(name, records, summarize(records, n=3, ks=[1, 2, 3], answer_type="math"),
                           source={"file": "math.jsonl"})


def test_files_match_the_results(pool, tmp_path: Path) -> None:
    results = [_result(pool, "math_a"), _result(pool, "math_b")]
    paths = write_results(results, tmp_path, model={"model": "tiny"}, settings={"n": 3}, examples=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math_a.jsonl", "math_b.jsonl", "report.md", "results.md",
                                                         "summary.json"]

    lines = [json.loads(line) for line in paths["math_a"].read_text().splitlines()]
    assert lines == results[0].records
    assert [line["correct"] for line in lines] == [True, False, False, True, False, False]
    assert [line["extracted_answer"] for line in lines] == ["13", "12", None, "4", "5", "3"]

    summary = json.loads(paths["summary"].read_text())
    assert summary["model"] == {"model": "tiny"} and summary["settings"] == {"n": 3}
    assert list(summary["benchmarks"]) == ["math_a", "math_b"]
    first = summary["benchmarks"]["math_a"]
    assert first["file"] == "math.jsonl"
    assert (first["num_prompts"], first["num_samples"], first["accuracy"]) == (2, 6, pytest.approx(2 / 6))
    assert first["pass@1"] == pytest.approx(1 / 3) and first["pass@3"] == 1.0

    table = paths["table"].read_text().splitlines()
    assert table[0].startswith("| benchmark | type | problems | n | avg@n (%) | pass@1 (%) | pass@2 (%) | pass@3 (%) |")
    assert len(table) == 4
    assert table[2].startswith("| math_a | math | 2 | 3 | 33.3 | 33.3 | 66.7 | 100.0 | -1.667 |")


def test_report_has_worked_examples(pool, tmp_path: Path) -> None:
    result = _result(pool, "math_a")
    report = write_results([result], tmp_path, examples=2)["report"].read_text()
    assert report.startswith("# Evaluation report")
    assert "## math_a" in report and "Source: `math.jsonl`" in report
    right = report[report.index("### Right answers"):report.index("### Wrong answers")]
    wrong = report[report.index("### Wrong answers"):]
    # Two right answers, from distinct problems, each with extracted answer against the reference.
    assert right.count("#### ") == 2
    assert "math.jsonl:1, sample 0" in right and "Extracted: `13` · reference: `13`" in right
    assert "math.jsonl:2, sample 0" in right and "Extracted: `4` · reference: `4`" in right
    # Wrong answers: a wrong boxed answer before an unanswered one, one per problem.
    assert wrong.count("#### ") == 2
    assert "Extracted: `12` · reference: `13`" in wrong and "Extracted: `5` · reference: `4`" in wrong
    assert "| no answer found | 1 | 16.7 |" in report
    # The response holding ``` and ```` fences sits in a longer fence, whole.
    assert "`````text\n```python\nprint(2 + 2)\n```\n```` nested ````\nso \\boxed{4}\n`````" in report

    report = write_results([result], tmp_path, examples=0)["report"].read_text()
    assert "### Right answers" not in report and "## math_a" in report


def test_unsafe_or_repeated_names_are_refused(pool, tmp_path: Path) -> None:
    result = _result(pool, "../escape")
    with pytest.raises(ValueError, match="safe file name"):
        write_results([result], tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        write_results([_result(pool, "a"), _result(pool, "a")], tmp_path)
