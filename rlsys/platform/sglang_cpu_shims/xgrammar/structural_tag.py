"""Format classes of ``xgrammar.structural_tag``, as empty pydantic models (see ``__init__``)."""

from __future__ import annotations

from typing import Any

from xgrammar import stand_in_model


def __getattr__(name: str) -> Any:
    if name[:1].isupper():
        return stand_in_model(name)
    raise AttributeError(f"the xgrammar CPU stand-in has no {name!r}")
