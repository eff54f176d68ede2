"""Shared fixtures: the real offline tokenizers, built into the rlsys cache on first use
(``$RLSYS_CACHE_DIR`` or ``~/.cache/rlsys``; a fresh machine pays the build once)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rlsys.models.offline import load_tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return load_tokenizer("qwen2.5-tokenizer")


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Writes lines (dicts are JSON-encoded, strings written verbatim) to a file in tmp_path."""

    def write(lines: list[Any], name: str = "prompts.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return path

    return write
