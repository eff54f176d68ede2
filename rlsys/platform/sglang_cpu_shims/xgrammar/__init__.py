"""CPU stand-in for ``xgrammar`` (constrained decoding; it pulls in the 1 GB Triton wheel).

sglang's HTTP server imports its function-call parsers at start, and a few of them import
``xgrammar.StructuralTag`` and format classes from ``xgrammar.structural_tag`` at module level to
declare pydantic response models. Rollout runs with ``grammar_backend="none"`` and never builds a
grammar. So every capitalised name here is an empty pydantic model that accepts any fields (valid
in pydantic annotations), and lower-case names (functions) are absent: sglang's own
``try: from xgrammar import ... except ImportError`` fallbacks then take their no-xgrammar branch.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__version__ = "0.0.0"

_models: dict[str, type[BaseModel]] = {}


def stand_in_model(name: str) -> type[BaseModel]:
    if name not in _models:
        _models[name] = type(name, (BaseModel,), {"model_config": ConfigDict(extra="allow"), "__module__": __name__})
    return _models[name]


def __getattr__(name: str) -> Any:
    if name[:1].isupper():
        return stand_in_model(name)
    raise AttributeError(f"the xgrammar CPU stand-in has no {name!r}")
