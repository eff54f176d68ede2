"""Reader of prompt files in the Boba JSONL format: one object per line, ``{"prompt": str,
"solutions": [str, ...]}``.

Choices
    * The prompt and answer keys are configurable (``DataConfig.prompt_key``/``answer_key``); other
      keys on a line are ignored, so files can carry metadata such as a difficulty level.
    * A prompt is a non-empty string, or a non-empty list of chat messages, each an object with
      string ``role`` and ``content``. Roles are not restricted here: the chat template decides
      what it accepts.
    * Answers are a non-empty string or a non-empty list of non-empty strings. A JSON integer
      (AIME files write ``"answer": 204``) is taken as its decimal string; any other number is a
      wrong type, not converted: "13" and 13.0 would check differently against a boxed answer, so
      the file must say which string is meant. Answers that are only whitespace count as empty.
    * Lines end at LF, CRLF or CR (Python's universal newlines) and nowhere else; a leading
      byte-order mark is ignored.
    * Every problem raises ``DataError`` with ``path:LINE: reason`` (1-based line numbers, the form
      editors and compilers use), at the first bad line. Blank lines are skipped; nothing else is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ChatMessages = list[dict[str, str]]
PromptContent = str | ChatMessages


class DataError(ValueError):
    """A data file is malformed; the message starts with ``path:LINE:`` where a line is at fault."""


@dataclass(frozen=True)
class Example:
    """One line of a prompt file, validated."""

    prompt: PromptContent
    """The prompt as written: a string or a list of chat messages."""
    answers: tuple[str, ...]
    """Reference answers; a response is correct when it matches any of them."""
    location: str
    """``path:LINE`` of the line it came from, for error messages and logs."""


def read_jsonl(path: str | Path, prompt_key: str = "prompt", answer_key: str = "solutions") -> list[Example]:
    """All examples of one JSONL file, in file order."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark, which some editors write, is not part of the first line.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    examples = []
    # split("\n") rather than splitlines(): JSON strings may hold raw U+2028 and similar
    # characters that splitlines() would treat as line ends, shifting every line number after.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{location}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {_json_type(record)}")
        examples.append(
            Example(
                prompt=_parse_prompt(record, prompt_key, location),
                answers=_parse_answers(record, answer_key, location),
                location=location,
            )
        )
    return examples


def _parse_prompt(record: dict[str, Any], key: str, location: str) -> PromptContent:
    if key not in record:
        raise DataError(f"{location}: missing key {key!r} (the prompt); keys present: {sorted(record)}")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{location}: {key!r} is an empty string")
        return value
    if isinstance(value, list):
        if not value:
            raise DataError(f"{location}: {key!r} is an empty list of messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise DataError(
                    f"{location}: {key}[{i}] must be an object with role and content, got {_json_type(message)}"
                )
            for field in ("role", "content"):
                if not isinstance(message.get(field), str):
                    found = _json_type(message.get(field))
                    raise DataError(f"{location}: {key}[{i}].{field} must be a string, got {found}")
        return [{"role": message["role"], "content": message["content"]} for message in value]
    raise DataError(f"{location}: {key!r} must be a string or a list of chat messages, got {_json_type(value)}")


def _parse_answers(record: dict[str, Any], key: str, location: str) -> tuple[str, ...]:
    if key not in record:
        raise DataError(f"{location}: missing key {key!r} (the answers); keys present: {sorted(record)}")
    value = record[key]
    if _is_integer(value):
        value = str(value)
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list):
        raise DataError(f"{location}: {key!r} must be a string or a list of strings, got {_json_type(value)}")
    if not answers:
        raise DataError(f"{location}: {key!r} is an empty list; at least one answer is needed")
    for i, answer in enumerate(answers):
        label = repr(key) if isinstance(value, str) else f"{key}[{i}]"
        if _is_integer(answer):
            answers[i] = answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{location}: {label} must be a string, got {_json_type(answer)}")
        if not answer.strip():
            raise DataError(f"{location}: {label} is an empty answer")
    return tuple(answers)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a file's author would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
