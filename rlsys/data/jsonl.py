"""Reader of prompt files in the Boba JSONL format: one object per line, ``{"prompt": str,
"solutions": [str, ...]}``.

Choices
    * The prompt and answer keys are configurable (``DataConfig.prompt_key``/``answer_key``); other
      keys on a line are ignored, so files can carry metadata such as a difficulty level.
    * A prompt is a non-empty string, or a non-empty list of chat messages, each an object with
      string ``role`` and ``content``. Roles are ``system``, ``user`` and ``assistant``: many chat
      templates render any role name as written, so a misspelt role would otherwise reach the
      model as text.
    * Answers are a non-empty string or number, or a non-empty list of them. A number is taken as
      it is written in the file (``204``, ``3.0``, ``1e-7``), never re-printed by Python, so
      the reward sees the digits the file's author wrote. ``null``, booleans, objects and nested
      lists are wrong types. Answers that are only whitespace count as empty.
    * Strings must be valid Unicode: a JSON escape of an unpaired surrogate (``"\\ud800"``) is a
      bad line, not a crash of the tokenizer later.
    * Lines end at LF, CRLF or CR (as Python's universal newlines) and nowhere else; a leading
      byte-order mark is ignored. Each line is decoded as UTF-8 on its own, so bytes that are not
      UTF-8 are reported with their line.
    * A line longer than ``max_line_bytes`` is a bad line; it is skipped without being held in
      memory, so one 50 MB line costs a scan, not a parse.
    * Bad lines (not UTF-8, too long, invalid JSON, wrong shape or types, unknown role) follow
      one rule. With ``max_malformed_fraction`` 0 (``read_jsonl``'s default) the first one raises
      ``DataError``. Otherwise each bad line is dropped and counted, with a warning naming the
      first ones, unless more than that fraction of the file's non-blank lines is bad: then
      ``DataError`` lists the first bad lines. A wrong key or a file of another format is then
      always an error, while a few broken lines in a large file are not.
    * Every error is a ``DataError`` whose message starts ``path:LINE: reason`` (1-based line
      numbers, the form editors and compilers use) for the first bad line, or ``path: reason``
      for the whole file: missing, unreadable, or empty (no non-blank line). Blank lines are
      skipped and are not counted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

ChatMessages = list[dict[str, str]]
PromptContent = str | ChatMessages

ROLES = ("system", "user", "assistant")
"""Roles a chat-message prompt may use."""
MAX_LINE_BYTES = 1 << 20
"""Default longest line, in bytes: a prompt of a few thousand tokens with its answers is a few
tens of kilobytes, so a longer line is almost always a file of another kind."""
LISTED_BAD_LINES = 5
"""Bad lines named in an error or a warning; the rest are counted."""

_BLOCK_BYTES = 1 << 20
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file is malformed; the message starts with ``path:LINE:`` where a line is at fault."""


class _BadLine(Exception):
    """One line is malformed; carries the reason, without the location."""


class _Number(str):
    """A JSON number kept as the text it is written with."""


@dataclass(frozen=True)
class Example:
    """One line of a prompt file, validated."""

    prompt: PromptContent
    """The prompt as written: a string or a list of chat messages."""
    answers: tuple[str, ...]
    """Reference answers; a response is correct when it matches any of them."""
    location: str
    """``path:LINE`` of the line it came from, for error messages and logs."""


@dataclass(frozen=True)
class JsonlContents:
    """The valid examples of one file and the bad lines that were dropped."""

    examples: list[Example]
    dropped: list[str]
    """``path:LINE: reason`` of every bad line dropped, in file order."""
    num_lines: int
    """Non-blank lines of the file."""


def read_jsonl(
    path: str | Path,
    prompt_key: str = "prompt",
    answer_key: str = "solutions",
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[Example]:
    """All examples of one JSONL file, in file order; the first bad line is an error."""
    return read_examples(path, prompt_key, answer_key, max_line_bytes=max_line_bytes).examples


def read_examples(
    path: str | Path,
    prompt_key: str = "prompt",
    answer_key: str = "solutions",
    *,
    max_malformed_fraction: float = 0.0,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> JsonlContents:
    """The examples of one JSONL file, bad lines dropped under the module's rule."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    examples: list[Example] = []
    bad: list[str] = []
    num_lines = 0
    with handle:
        try:
            for line_number, line in _lines(handle, max_line_bytes):
                location = f"{path}:{line_number}"
                try:
                    example = _parse_line(line, prompt_key, answer_key, location, max_line_bytes)
                except _BadLine as exc:
                    num_lines += 1
                    bad.append(f"{location}: {exc}")
                    if max_malformed_fraction == 0:
                        raise DataError(bad[0]) from None
                    continue
                if example is not None:
                    num_lines += 1
                    examples.append(example)
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not num_lines:
        raise DataError(f"{path}: empty file: no JSON lines, only blank ones" if path.stat().st_size
                        else f"{path}: empty file")
    if len(bad) > max_malformed_fraction * num_lines:
        raise DataError(
            "\n".join(bad[:LISTED_BAD_LINES])
            + (f"\n... and {len(bad) - LISTED_BAD_LINES} more" if len(bad) > LISTED_BAD_LINES else "")
            + f"\n{path}: {len(bad)} of {num_lines} lines are malformed, more than "
            f"data.max_malformed_fraction={max_malformed_fraction} allows"
        )
    if bad:
        logger.warning(
            "%s: dropped %d malformed of %d lines (within data.max_malformed_fraction=%s): %s%s",
            path, len(bad), num_lines, max_malformed_fraction, "; ".join(bad[:LISTED_BAD_LINES]),
            f"; ... and {len(bad) - LISTED_BAD_LINES} more" if len(bad) > LISTED_BAD_LINES else "",
        )
    return JsonlContents(examples, bad, num_lines)


def first_object(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """The first non-blank line of a file as an object; ``{}`` when the file is missing or that
    line is malformed (``read_examples`` reports those with their line numbers)."""
    try:
        with Path(path).open("rb") as handle:
            for _, line in _lines(handle, max_line_bytes):
                if isinstance(line, int):
                    return {}
                text = line.decode("utf-8")
                if text.strip():
                    record = json.loads(text, parse_int=_Number, parse_float=_Number, parse_constant=_reject_constant)
                    return record if isinstance(record, dict) else {}
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        pass
    return {}


def _lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """``(line number, bytes without the line end)`` for every line of a binary file, or
    ``(line number, length)`` for a line longer than ``max_line_bytes``, which is never held."""
    number, line, length, first = 1, bytearray(), 0, True
    while block := handle.read(_BLOCK_BYTES):
        if block.endswith(b"\r"):
            block += handle.read(1)  # a CRLF split between two blocks is one line end
        if first:
            block, first = block.removeprefix(_BOM), False
        start = 0
        for end in _LINE_END.finditer(block):
            length += end.start() - start
            if length <= max_line_bytes:
                line += block[start:end.start()]
            yield number, bytes(line) if length <= max_line_bytes else length
            number, line, length, start = number + 1, bytearray(), 0, end.end()
        length += len(block) - start
        if length <= max_line_bytes:
            line += block[start:]
        else:
            line.clear()
    if length:
        yield number, bytes(line) if length <= max_line_bytes else length


def _parse_line(
    line: bytes | int, prompt_key: str, answer_key: str, location: str, max_line_bytes: int
) -> Example | None:
    """The example of one line; None for a blank line; ``_BadLine`` for a malformed one."""
    if isinstance(line, int):
        raise _BadLine(f"line of {line} bytes is longer than data.max_line_bytes={max_line_bytes}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not UTF-8: {exc.reason} (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} "
                       "of the line)") from None
    if not text.strip():
        return None
    try:
        # Numbers stay the text they are written with: answers keep their digits, and a
        # 5000-digit integer is not Python's int-conversion error.
        record = json.loads(text, parse_int=_Number, parse_float=_Number, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # from _reject_constant
        raise _BadLine(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise _BadLine("invalid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {_json_type(record)}")
    return Example(_parse_prompt(record, prompt_key), _parse_answers(record, answer_key), location)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_prompt(record: dict[str, Any], key: str) -> PromptContent:
    if key not in record:
        raise _BadLine(f"missing key {key!r} (the prompt); keys present: {sorted(record)}")
    value = record[key]
    if isinstance(value, str) and not isinstance(value, _Number):
        if not value.strip():
            raise _BadLine(f"{key!r} is an empty string")
        _check_unicode(value, repr(key))
        return value
    if isinstance(value, list):
        if not value:
            raise _BadLine(f"{key!r} is an empty list of messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise _BadLine(f"{key}[{i}] must be an object with role and content, got {_json_type(message)}")
            for field in ("role", "content"):
                found = message.get(field)
                if not isinstance(found, str) or isinstance(found, _Number):
                    raise _BadLine(f"{key}[{i}].{field} must be a string, got {_json_type(found)}")
                _check_unicode(found, f"{key}[{i}].{field}")
            if message["role"] not in ROLES:
                raise _BadLine(f"{key}[{i}].role is {message['role']!r}; allowed roles: {', '.join(ROLES)}")
        return [{"role": message["role"], "content": message["content"]} for message in value]
    raise _BadLine(f"{key!r} must be a string or a list of chat messages, got {_json_type(value)}")


def _parse_answers(record: dict[str, Any], key: str) -> tuple[str, ...]:
    if key not in record:
        raise _BadLine(f"missing key {key!r} (the answers); keys present: {sorted(record)}")
    value = record[key]
    single = isinstance(value, str)
    answers = [value] if single else value
    if not isinstance(answers, list):
        raise _BadLine(f"{key!r} must be a string, a number or a list of them, got {_json_type(value)}")
    if not answers:
        raise _BadLine(f"{key!r} is an empty list; at least one answer is needed")
    for i, answer in enumerate(answers):
        label = repr(key) if single else f"{key}[{i}]"
        if not isinstance(answer, str):
            raise _BadLine(f"{label} must be a string or a number, got {_json_type(answer)}")
        if not answer.strip():
            raise _BadLine(f"{label} is an empty answer")
        _check_unicode(answer, label)
    return tuple(str(answer) for answer in answers)


def _check_unicode(text: str, label: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadLine(f"{label} holds an unpaired surrogate \\u{ord(text[exc.start]):04x} at character "
                       f"{exc.start + 1}, which is not valid Unicode") from None


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a file's author would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, _Number):
        return f"number {value}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
