"""Extra reward terms named by import path in ``RewardConfig.extra``.

A term is ``RewardTerm(path="package.module:function", weight=w)``; the function is called as
``function(response, reference) -> float`` with the reference exactly as given to the pool (a
string or a list of strings), and ``w * value`` is added to the total. Paths are imported and
checked when the pool starts, in the parent, so that a typo fails before any batch with an error
that names ``reward.extra[i].path``; the workers import them again, since functions are not sent
across processes.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlsys.config import ConfigError, RewardTerm

TermFunction = Callable[[str, "str | list[str]"], float]


@dataclass(frozen=True)
class LoadedTerm:
    path: str
    weight: float
    function: TermFunction


def load_term_function(path: str, field_name: str) -> TermFunction:
    """Import ``package.module:function`` and check it can be called with two arguments.

    Raises ConfigError starting with ``field_name`` when the path is malformed, the module does
    not import, the attribute is missing, or it is not a two-argument callable.
    """
    module_name, separator, attribute_path = path.partition(":")
    if not separator or not module_name or not attribute_path:
        raise ConfigError(f"{field_name}: must look like 'package.module:function', got {path!r}")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(f"{field_name}: cannot import module {module_name!r} ({type(error).__name__}: {error})") from None
    for name in attribute_path.split("."):
        if not hasattr(target, name):
            raise ConfigError(f"{field_name}: module {module_name!r} has no attribute {attribute_path!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ConfigError(f"{field_name}: {path!r} is not callable")
    try:
        inspect.signature(target).bind("response", "reference")
    except TypeError:
        raise ConfigError(f"{field_name}: {path!r} must accept (response, reference)") from None
    except ValueError:
        pass  # Some builtins expose no signature; they are called as they are.
    return target


def load_terms(terms: Sequence[RewardTerm], section: str = "reward") -> list[LoadedTerm]:
    """Load every extra term, naming a bad one as ``reward.extra[i].path``."""
    loaded = []
    for index, term in enumerate(terms):
        function = load_term_function(term.path, f"{section}.extra[{index}].path")
        loaded.append(LoadedTerm(path=term.path, weight=float(term.weight), function=function))
    return loaded
