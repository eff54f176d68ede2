"""Shared machinery of the placeholder stand-in packages in this folder (``triton``, ``torchvision``,
``soundfile``).

A stand-in package answers every attribute with a ``Placeholder`` and every submodule import
with another stand-in module, so third-party modules that merely *define* things against the
package at import time (kernel signatures, enum-valued defaults, mapping tables, base classes)
import cleanly. Nothing in a stand-in computes anything.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


_stand_in_classes: dict[str, type] = {}


class _StandInClassMeta(type):
    """Class attributes of a stand-in class are stand-in names too (enum members and the like)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stand_in_name(f"{cls.__module__}.{cls.__qualname__}.{name}")


class StandInError(Exception, metaclass=_StandInClassMeta):
    """Base of every capitalised stand-in name: third-party code uses those as classes (base
    classes, ``isinstance`` targets, ``except`` clauses), and an exception class serves all three.
    Nothing ever raises one."""


def stand_in_name(qualified_name: str) -> Any:
    """The object a stand-in gives for ``qualified_name``: one class per capitalised name (the
    same class on every access, so ``isinstance`` stays consistent), else a ``Placeholder``."""
    short = qualified_name.rpartition(".")[2]
    if short[:1].isupper():
        if qualified_name not in _stand_in_classes:
            module, _, name = qualified_name.rpartition(".")
            _stand_in_classes[qualified_name] = type(name, (StandInError,), {"__module__": module})
        return _stand_in_classes[qualified_name]
    return Placeholder(qualified_name)


class Placeholder:
    """A lower-case name of a stand-in package. Usable in annotations, defaults and dict keys;
    calling it with a single callable returns that callable (decorator use)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<CPU stand-in {self._name}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stand_in_name(f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return Placeholder(f"{self._name}(...)")

    def __getitem__(self, key: Any) -> Any:
        return Placeholder(f"{self._name}[...]")


class StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stand_in_name(f"{self.__name__}.{name}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``<package>.<anything>`` yield stand-in modules."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self.package + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        parent_name, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent_name], child, module)


def make_stand_in_package(package: types.ModuleType) -> None:
    """Turn an imported top-level package into a stand-in: unknown attributes become
    placeholders and unknown submodules stand-in modules."""
    if "." in package.__name__:
        raise ImportError(f"{package.__name__}: stand-ins only work as top-level packages of an sglang process")
    package.__class__ = StandInModule
    if not any(isinstance(f, _SubmoduleFinder) and f.package == package.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _SubmoduleFinder(package.__name__))
