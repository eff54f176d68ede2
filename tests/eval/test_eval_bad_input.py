"""Risk: a hostile benchmark file (bytes that are not UTF-8, a 50 MB line, an empty file, answers of
mixed types, unknown chat roles, a few broken lines among good ones) crashes ``rlsys eval`` after
the model is loaded, or is scored over fewer problems than the file holds without a word.

Benchmarks are read strictly (rlsys/eval/inputs.py): every bad line exits 2 naming file:line,
before any model is converted or engine started, even where training would drop it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsys.cli import main
from rlsys.data.jsonl import MAX_LINE_BYTES

REPO = Path(__file__).resolve().parents[2]
GOOD = b'{"problem": "What is 1 + 1?", "answer": "2"}\n'


def _eval_command(benchmark: Path, output: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [sys.executable, "-m", "rlsys", "eval", "smollm2-135m-grpo-cpu", *overrides, "--benchmarks",
               str(benchmark), "--output", str(output)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    return result, time.monotonic() - started


def test_a_50_mb_line_exits_2_at_once_naming_file_and_line(tmp_path: Path) -> None:
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.write(GOOD + b'{"problem": "')
        for _ in range(50):
            handle.write(b"x" * (1 << 20))
        handle.write(b'", "answer": "1"}\n' + GOOD)
    result, elapsed = _eval_command(huge, tmp_path / "out")
    huge.unlink()
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"rlsys eval: {huge}:2: line of {(50 << 20) + 30} bytes is longer than "
                                    f"data.max_line_bytes={MAX_LINE_BYTES}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert elapsed < 120, f"rlsys eval took {elapsed:.0f} s to reject a 50 MB line"  # about 5 s on an idle machine


def test_the_line_limit_is_the_configs(tmp_path: Path) -> None:
    benchmark = tmp_path / "long-line.jsonl"
    benchmark.write_bytes(GOOD + b'{"problem": "' + b"y" * 2000 + b'", "answer": "1"}\n')
    result, _ = _eval_command(benchmark, tmp_path / "out", "data.max_line_bytes=1024")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"rlsys eval: {benchmark}:2: line of 2030 bytes is longer than "
                                    "data.max_line_bytes=1024"), result.stderr[-3000:]


def test_an_empty_benchmark_exits_2_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "aime.jsonl"
    empty.write_bytes(b"")
    result, _ = _eval_command(empty, tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"rlsys eval: {empty}: empty file\n"


@pytest.mark.parametrize("bad_line, reason", [
    (b'{"problem": "caf\xe9?", "answer": "1"}', "not UTF-8: invalid continuation byte (byte 0xe9 at byte 17"),
    (b'{"problem": "x", "answer": ["3", 3, 3.0, null, {"a": 1}]}', "answer[3] must be a string or a number, got null"),
    (b'{"problem": [{"role": "User", "content": "x"}], "answer": "1"}',
     "problem[0].role is 'User'; allowed roles: system, user, assistant"),
    (b'{"problem": "\\udc80", "answer": "1"}', "'problem' holds an unpaired surrogate \\udc80 at character 1"),
    (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
])
def test_one_bad_line_among_many_is_an_error_in_eval(bad_line: bytes, reason: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # 1 bad line in 300 is below training's data.max_malformed_fraction; a benchmark still refuses it.
    lines = [json.dumps({"problem": f"What is {i} + 1?", "answer": i + 1}).encode() + b"\n" for i in range(299)]
    lines.insert(123, bad_line + b"\n")
    path = tmp_path / "math.jsonl"
    path.write_bytes(b"".join(lines))
    code = main(["eval", "smollm2-135m-grpo-cpu", "--benchmarks", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"rlsys eval: {path}:124: {reason}"), err
