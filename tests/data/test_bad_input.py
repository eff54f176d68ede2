"""Risk: hostile training data (bytes that are not UTF-8, a 50 MB line, an empty file, a file of
mostly broken lines, answers of mixed types, unknown chat roles, prompts over the length limit)
crashes deep in a worker, hangs, exhausts memory, or is dropped without anyone being told.

Each case is either an error whose message starts ``file:line:`` (or ``file:`` for the whole file)
or a drop counted under the documented rule (rlsys/data/jsonl.py, rlsys/data/dataset.py). The
command-line cases run ``rlsys train`` on the CPU default and must stop within seconds, before
the driver starts Ray ("writing to ..." is its last line before the workers).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from rlsys.config import ConfigError, DataConfig, load_config
from rlsys.data import DataError, load_prompts, load_train_prompts, load_val_prompts, read_examples, read_jsonl
from rlsys.data.jsonl import MAX_LINE_BYTES

REPO = Path(__file__).resolve().parents[2]
GOOD = b'{"prompt": "What is 1 + 1?", "solutions": ["2"]}'


def _good(i: int) -> bytes:
    return json.dumps({"prompt": f"What is {i} + 1?", "solutions": [str(i + 1)]}).encode()


def _write(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def _write_huge_line(path: Path, size: int) -> None:
    """A file whose line 2 is a ``size``-byte JSON object, written in pieces."""
    with path.open("wb") as handle:
        handle.write(GOOD + b"\n" + b'{"prompt": "')
        piece = b"x" * (1 << 20)
        for _ in range(size >> 20):
            handle.write(piece)
        handle.write(b'", "solutions": ["1"]}\n' + GOOD + b"\n")


# -- the reader ---------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_are_reported_with_their_line(tmp_path):
    latin1 = _write(tmp_path / "latin1.jsonl", [GOOD, GOOD, '{"prompt": "Café?", "solutions": ["1"]}'.encode("latin-1")])
    with pytest.raises(DataError, match=rf"^{re.escape(str(latin1))}:3: not UTF-8: invalid continuation byte "
                                        r"\(byte 0xe9 at byte 16 of the line\)$"):
        read_jsonl(latin1)
    # A byte-order mark and CRLF line ends change nothing; the line number is still that of the bad line.
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n" + b'{"prompt": "\xff", "solutions": ["1"]}\r\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(windows))}:3: not UTF-8: invalid start byte"):
        read_jsonl(windows)


def test_line_ends_are_lf_crlf_or_cr_even_across_read_blocks(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(GOOD + b"\n" + GOOD + b"\r\n" + GOOD + b"\r" + b'{"prompt": "x"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(mixed))}:4: missing key 'solutions'"):
        read_jsonl(mixed)
    # The reader takes 1 MiB at a time: here the CR of a CRLF is the block's last byte.
    head = b'{"prompt": "'
    tail = b'", "solutions": ["1"]}'
    first = head + b"y" * ((1 << 20) - 1 - len(head) - len(tail)) + tail
    boundary = _write(tmp_path / "boundary.jsonl", [first, b'{"prompt": "x"}'], end=b"\r\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(boundary))}:2: missing key 'solutions'"):
        read_jsonl(boundary)


def test_a_50_mb_line_is_skipped_unread_fast_and_in_little_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    _write_huge_line(path, 50 << 20)
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            read_jsonl(path)
        contents = read_examples(path, max_malformed_fraction=0.5)
        elapsed, peak = time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        path.unlink()
    message = f"{path}:2: line of {(50 << 20) + 34} bytes is longer than data.max_line_bytes={MAX_LINE_BYTES}"
    assert str(caught.value) == message
    assert [e.location for e in contents.examples] == [f"{path}:1", f"{path}:3"]
    assert contents.dropped == [message] and contents.num_lines == 3
    assert elapsed < 10, f"two reads of a 50 MB line took {elapsed:.1f} s"
    assert peak < 8 << 20, f"reading held {peak / 2**20:.0f} MiB"


def test_an_empty_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: empty file$"):
        read_jsonl(empty)
    blank = _write(tmp_path / "blank.jsonl", [b"", b"  ", b"\t"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(blank))}: empty file: no JSON lines, only blank ones$"):
        read_examples(blank, max_malformed_fraction=0.5)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: cannot read: Is a directory$"):
        read_jsonl(tmp_path)


def test_a_few_bad_lines_are_dropped_counted_and_named_in_a_warning(tmp_path, caplog):
    lines = [_good(i) for i in range(99)]
    lines.insert(50, b'{"prompt": "x", "solutions": ["3", 3, 3.0, null, {"a": 1}]}')
    path = _write(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rlsys.data.jsonl"):
        contents = read_examples(path, max_malformed_fraction=0.01)
    assert len(contents.examples) == 99 and contents.num_lines == 100
    assert contents.dropped == [f"{path}:51: solutions[3] must be a string or a number, got null"]
    assert f"{path}: dropped 1 malformed of 100 lines (within data.max_malformed_fraction=0.01)" in caplog.text
    assert f"{path}:51: solutions[3]" in caplog.text
    # "More than the fraction" is the error: 2 of 100 is over 0.01.
    lines.insert(10, b'{"prompt": [{"role": "human", "content": "hi"}], "solutions": ["1"]}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:11: prompt\[0\].role is 'human'"):
        read_examples(_write(path, lines), max_malformed_fraction=0.01)


def test_a_file_of_mostly_bad_lines_is_an_error_listing_the_first(tmp_path):
    bad = [
        b'{"prompt": "caf\xe9", "solutions": ["1"]}',
        b'{"prompt": [{"role": "tool", "content": "x"}], "solutions": ["1"]}',
        b'{"prompt": "x", "solutions": ["3", 3, 3.0, null, {"a": 1}]}',
        b'{"prompt": "x", "solutions": ["1"]',
        b'{"question": "x", "solutions": ["1"]}',
        b'{"prompt": "\\ud800", "solutions": ["1"]}',
        b'"just a string"',
    ]
    path = _write(tmp_path / "broken.jsonl", [_good(0), *bad[:4], _good(1), *bad[4:], _good(2)])
    with pytest.raises(DataError) as caught:
        read_examples(path, max_malformed_fraction=0.01)
    assert str(caught.value).splitlines() == [
        f"{path}:2: not UTF-8: invalid continuation byte (byte 0xe9 at byte 16 of the line)",
        f"{path}:3: prompt[0].role is 'tool'; allowed roles: system, user, assistant",
        f"{path}:4: solutions[3] must be a string or a number, got null",
        f"{path}:5: invalid JSON: Expecting ',' delimiter at column 35",
        f"{path}:7: missing key 'prompt' (the prompt); keys present: ['question', 'solutions']",
        "... and 2 more",
        f"{path}: 7 of 10 lines are malformed, more than data.max_malformed_fraction=0.01 allows",
    ]


# -- rendering, the length limit and the config -------------------------------------------------


def test_overlong_prompts_are_dropped_truncated_or_an_error(smollm2_tokenizer, tmp_path):
    # Digits are single tokens for SmolLM2: the chat-rendered prompt grows with the digits.
    path = _write(tmp_path / "long.jsonl", [json.dumps({"prompt": "7" * n, "solutions": ["1"]}).encode()
                                            for n in (5, 300, 10, 200)])
    every = load_prompts([path], smollm2_tokenizer)
    lengths = [len(p.token_ids) for p in every]
    limit = lengths[2] + 40  # keeps the prompts of 5 and 10 digits

    dropped = load_prompts([path], smollm2_tokenizer, max_prompt_length=limit)
    assert [p.location for p in dropped] == [f"{path}:1", f"{path}:3"]
    assert (dropped.num_dropped_overlong, dropped.num_truncated) == (2, 0)
    assert dropped.summary() == f"2 prompts, 2 longer than {limit} tokens dropped"

    cut = load_prompts([path], smollm2_tokenizer, max_prompt_length=limit, overlong_prompts="truncate")
    assert [len(p.token_ids) for p in cut] == [lengths[0], limit, lengths[2], limit]
    assert (cut.num_dropped_overlong, cut.num_truncated) == (0, 2)
    assert cut.counts() == {"prompts": 4, "dropped_overlong": 0, "truncated": 2, "dropped_malformed": 0}
    # The start of the template and the assistant turn survive; the middle of the problem goes.
    full, short = every[1].token_ids, cut[1].token_ids
    assert short == full[: limit - limit // 2] + full[-(limit // 2):]
    assert cut[1].text.startswith("<|im_start|>") and cut[1].text.endswith("<|im_end|>\n<|im_start|>assistant\n")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: prompt of {lengths[1]} tokens is longer than "
                                        rf"data.max_prompt_length={limit}; 2 of 4 prompts are "
                                        r"\(data.overlong_prompts=error"):
        load_prompts([path], smollm2_tokenizer, max_prompt_length=limit, overlong_prompts="error")


def test_splits_left_without_prompts_are_errors(smollm2_tokenizer, tmp_path):
    _write(tmp_path / "train.jsonl", [_good(i) for i in range(200)] + [b"{broken"])
    _write(tmp_path / "val.jsonl", [json.dumps({"prompt": "7" * 400, "solutions": ["1"]}).encode()])
    config = DataConfig(train_files=["train.jsonl"], val_files=["val.jsonl"], max_prompt_length=100)
    train = load_train_prompts(config, smollm2_tokenizer, base=tmp_path)
    assert (len(train), train.num_dropped_malformed) == (200, 1)
    assert train.summary() == "200 prompts, 1 malformed line dropped"
    with pytest.raises(DataError, match=r"^data.val_files: no prompts in \['val.jsonl'\] \(1 longer than "
                                        r"data.max_prompt_length=100, 0 malformed lines\)"):
        load_val_prompts(config, smollm2_tokenizer, base=tmp_path)


@pytest.mark.parametrize("override, message", [
    ("data.overlong_prompts=cut", "data.overlong_prompts: must be one of drop, truncate, error, got 'cut'"),
    ("data.max_malformed_fraction=1", "data.max_malformed_fraction: must be in [0, 1), got 1"),
    ("data.max_line_bytes=0", "data.max_line_bytes: must be positive, got 0"),
])
def test_bad_data_fields_name_the_field(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config("smollm2-135m-grpo-cpu", [override])
    assert str(caught.value).startswith(message), str(caught.value)


def test_config_default_line_limit_is_the_readers():
    assert DataConfig().max_line_bytes == MAX_LINE_BYTES


# -- rlsys train --------------------------------------------------------------------------------


def _train(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", f"runner.output_dir={tmp_path / 'out'}",
               *overrides]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    return result, time.monotonic() - started


def _bad_train_data(case: str, tmp_path: Path) -> tuple[list[str], str]:
    """A hostile input for ``rlsys train``: (overrides, the start of the error it must print)."""
    path = tmp_path / f"{case}.jsonl"
    if case == "not-utf8":
        _write(path, [_good(0), b'{"prompt": "caf\xe9", "solutions": ["1"]}'])
        return [f"data.train_files=[{path}]"], f"{path}:2: not UTF-8"
    if case == "50mb-line":
        _write_huge_line(path, 50 << 20)
        return [f"data.val_files=[{path}]"], f"{path}:2: line of {(50 << 20) + 34} bytes is longer than data.max_line_bytes="
    if case == "mostly-broken":
        _write(path, [_good(0), b'{"prompt": [{"role": "bot", "content": "hi"}], "solutions": ["1"]}',
                      b'{"prompt": "x", "solutions": ["3", 3, 3.0, null, {"a": 1}]}', _good(1)])
        return [f"data.train_files=[{path}]"], f"{path}:2: prompt[0].role is 'bot'; allowed roles: system, user, assistant"
    if case == "overlong-error":
        _write(path, [_good(0), json.dumps({"prompt": "7" * 900, "solutions": ["1"]}).encode()])
        return [f"data.train_files=[{path}]", "data.overlong_prompts=error"], f"{path}:2: prompt of "
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["not-utf8", "50mb-line", "mostly-broken", "overlong-error"])
def test_train_stops_on_bad_data_before_any_worker_naming_file_and_line(case, tmp_path):
    overrides, first_line = _bad_train_data(case, tmp_path)
    result, elapsed = _train(tmp_path, *overrides)
    (tmp_path / f"{case}.jsonl").unlink()
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"rlsys train: error: {first_line}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "writing to" not in result.stderr, result.stderr[-3000:]
    assert elapsed < 120, f"rlsys train took {elapsed:.0f} s to reject {case}"  # about 5 s on an idle machine
    if case == "mostly-broken":
        assert f"{tmp_path / case}.jsonl:3: solutions[3] must be a string or a number, got null" in result.stderr
        assert "2 of 4 lines are malformed, more than data.max_malformed_fraction=0.01 allows" in result.stderr


def test_train_prints_what_it_dropped_at_start(tmp_path):
    lines = [_good(i) for i in range(150)]
    lines.insert(7, json.dumps({"prompt": "7" * 900, "solutions": ["1"]}).encode())
    lines.insert(60, b'{"prompt": "\xff", "solutions": ["1"]}')
    train = _write(tmp_path / "train.jsonl", lines)
    # A resume directory that does not exist stops the run right after the data is loaded.
    result, _ = _train(tmp_path, f"data.train_files=[{train}]", f"runner.resume_dir={tmp_path / 'none'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"[rlsys] warning: {train}: dropped 1 malformed of 152 lines (within data.max_malformed_fraction=0.01): " \
           f"{train}:61: not UTF-8" in result.stderr
    assert "[rlsys] warning: dropped 1 of 151 prompts longer than data.max_prompt_length=512 tokens (data.overlong_prompts=drop)" \
           f" from {train}; the first: {train}:8" in result.stderr
    assert "[rlsys] data: training 150 prompts, 1 longer than 512 tokens dropped, 1 malformed line dropped; " \
           "validation 64 prompts" in result.stderr
    assert "rlsys train: error: runner.resume_dir:" in result.stderr
