"""The Boba JSONL reader: accepted shapes, and ``path:LINE:`` errors for everything else."""

from __future__ import annotations

import re

import pytest

from rlsys.data import DataError, read_jsonl

GOOD = {"prompt": "What is 1 + 1?", "solutions": ["2"]}


def test_reads_strings_lists_and_messages_and_skips_blank_lines(write_jsonl):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    path = write_jsonl(
        [
            GOOD,
            "",
            "   ",
            {"prompt": "3 + 4?", "solutions": "7", "task": "extra keys are ignored"},
            {"prompt": messages, "solutions": ["4", "four"]},
        ]
    )
    examples = read_jsonl(path)
    assert [e.prompt for e in examples] == ["What is 1 + 1?", "3 + 4?", messages]
    assert [e.answers for e in examples] == [("2",), ("7",), ("4", "four")]
    assert [e.location for e in examples] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_custom_keys(write_jsonl):
    path = write_jsonl([{"question": "5 - 3?", "answer": "2"}])
    [example] = read_jsonl(path, prompt_key="question", answer_key="answer")
    assert (example.prompt, example.answers) == ("5 - 3?", ("2",))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: missing key 'prompt'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"prompt": "1 + 1?", "solutions": ["2"]', "invalid JSON"),
        ('["1 + 1?", ["2"]]', "expected a JSON object, got array"),
        ('{"solutions": ["2"]}', "missing key 'prompt'"),
        ('{"prompt": "1 + 1?"}', "missing key 'solutions'"),
        ('{"prompt": 11, "solutions": ["2"]}', "'prompt' must be a string or a list of chat messages, got number 11"),
        ('{"prompt": "", "solutions": ["2"]}', "'prompt' is an empty string"),
        ('{"prompt": [], "solutions": ["2"]}', "'prompt' is an empty list of messages"),
        ('{"prompt": [{"role": "user"}], "solutions": ["2"]}', r"prompt\[0\].content must be a string, got null"),
        ('{"prompt": ["hi"], "solutions": ["2"]}', r"prompt\[0\] must be an object"),
        ('{"prompt": "1 + 1?", "solutions": {"a": "2"}}', "'solutions' must be a string, a number or a list of them, "
                                                          "got object"),
        ('{"prompt": "1 + 1?", "solutions": [true]}', r"solutions\[0\] must be a string or a number, got boolean"),
        ('{"prompt": "1 + 1?", "solutions": ["3", 3, 3.0, null, {"a": 1}]}',
         r"solutions\[3\] must be a string or a number, got null"),
        ('{"prompt": "1 + 1?", "solutions": ["3", {"a": 1}]}', r"solutions\[1\] must be a string or a number, got obj"),
        ('{"prompt": "1 + 1?", "solutions": [["2"]]}', r"solutions\[0\] must be a string or a number, got array"),
        ('{"prompt": "1 + 1?", "solutions": [NaN]}', "invalid JSON: NaN is not a JSON number"),
        ('{"prompt": "1 + 1?", "solutions": Infinity}', "invalid JSON: Infinity is not a JSON number"),
        ('{"prompt": [{"role": "usr", "content": "1 + 1?"}], "solutions": ["2"]}',
         r"prompt\[0\].role is 'usr'; allowed roles: system, user, assistant"),
        ('{"prompt": [{"role": 1, "content": "1 + 1?"}], "solutions": ["2"]}',
         r"prompt\[0\].role must be a string, got number 1"),
        ('{"prompt": "1 + \\ud800?", "solutions": ["2"]}', r"'prompt' holds an unpaired surrogate \\ud800 at character 5"),
        ('{"prompt": [{"role": "user", "content": "\\udfff"}], "solutions": ["2"]}',
         r"prompt\[0\].content holds an unpaired surrogate"),
        ('{"prompt": "1 + 1?", "solutions": ["\\ud83d"]}', r"solutions\[0\] holds an unpaired surrogate"),
        ('{"prompt": "1 + 1?", "solutions": []}', "'solutions' is an empty list"),
        ('{"prompt": "1 + 1?", "solutions": ""}', "'solutions' is an empty answer"),
        ('{"prompt": "1 + 1?", "solutions": ["2", " "]}', r"solutions\[1\] is an empty answer"),
    ],
)
def test_errors_name_file_and_line(write_jsonl, bad_line, reason):
    # Blank line 2 must still count, so the bad line is line 4.
    path = write_jsonl([GOOD, "", GOOD, bad_line, GOOD], name="train-set.jsonl")
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: "), message
    assert caught.match(reason)


def test_deeply_nested_json_is_a_bad_line_not_a_recursion_error(write_jsonl):
    path = write_jsonl([GOOD, "[" * 100_000 + "]" * 100_000])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON: nested too deeply$"):
        read_jsonl(path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_line_numbers_ignore_unicode_line_separators_inside_strings(write_jsonl):
    # U+2028 is valid unescaped inside a JSON string; it must not start a new line.
    path = write_jsonl(['{"prompt": "a\u2028b", "solutions": ["1"]}', '{"prompt": "x"}'])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing key 'solutions'"):
        read_jsonl(path)


def test_number_answers_are_read_as_written(tmp_path):
    path = tmp_path / "aime.jsonl"
    big = "9" * 5000  # beyond Python's int-to-str limit: kept as text, not a ValueError
    path.write_text('{"prompt": "p", "solutions": 204}\n{"prompt": "q", "solutions": [7, "8"]}\n'
                    '{"prompt": "r", "solutions": ["3", 3, 3.0, -0.5e3, 1E-7]}\n'
                    f'{{"prompt": "s", "solutions": {big}, "id": {big}}}\n')
    assert [e.answers for e in read_jsonl(path)] == [("204",), ("7", "8"), ("3", "3", "3.0", "-0.5e3", "1E-7"),
                                                     (big,)]
    assert all(type(answer) is str for e in read_jsonl(path) for answer in e.answers)
