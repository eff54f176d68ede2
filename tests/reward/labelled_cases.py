"""Loader of the labelled reward cases in ``cases.jsonl`` (shared by the tests and the benchmark).

Each line has ``category``, ``response``, ``reference`` (a string or a list of strings),
``expected`` (whether the response's answer equals a reference) and ``note``. Giant hostile
inputs are stored compactly: a line with ``repeat: {"unit": u, "count": n}`` has every
``<<R>>`` in its response replaced by ``u * n`` when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CASES_PATH = Path(__file__).with_name("cases.jsonl")
REPEAT_MARK = "<<R>>"


@dataclass(frozen=True)
class LabelledCase:
    line: int
    category: str
    response: str
    reference: str | list[str]
    expected: bool
    note: str

    @property
    def label(self) -> str:
        return f"line {self.line} [{self.category}] {self.note}".strip()


def load_cases(path: Path = CASES_PATH) -> list[LabelledCase]:
    cases = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        response = row["response"]
        if "repeat" in row:
            response = response.replace(REPEAT_MARK, row["repeat"]["unit"] * row["repeat"]["count"])
        cases.append(
            LabelledCase(
                line=line_number,
                category=row["category"],
                response=response,
                reference=row["reference"],
                expected=bool(row["expected"]),
                note=row.get("note", ""),
            )
        )
    return cases
