"""CPU stand-in for ``triton``, so that sglang's modules that define Triton kernels import on CPU.

On ``sys.path`` only in sglang processes on CPU (see ``rlsys/platform/sglang_cpu.py``).
``@triton.jit`` / ``@triton.autotune`` / ``@triton.heuristics`` wrap the Python function in a
``CpuUnavailableKernel``; other ``triton.*`` names and submodules are placeholders. Launching a
kernel (``kernel[grid](...)`` or a call) raises ``RuntimeError`` naming it: on CPU sglang must take
its torch-native paths, and a launch reaching this module is a bug to surface, not to paper over.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rlsys_cpu_stand_in import Placeholder, make_stand_in_package

__version__ = "0.0.0"
"""No Triton is installed; version checks see the oldest possible one."""


class CpuUnavailableKernel:
    """A Triton kernel defined on CPU: inspectable, never runnable."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"Triton kernel {self.__name__!r} was launched, but this process runs sglang on CPU "
            "with rlsys's triton stand-in, which has no kernels; the CPU code path must not reach it"
        )

    __call__ = _refuse

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self._refuse

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Placeholder(f"{self.__name__}.{name}")


def _kernel_decorator(*args: Any, **kwargs: Any) -> Any:
    """Serves ``@jit`` and ``@jit(...)`` alike (and ``autotune``/``heuristics``, always called)."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        target = args[0]
        return target if isinstance(target, CpuUnavailableKernel) else CpuUnavailableKernel(target)
    return _kernel_decorator


jit = _kernel_decorator
autotune = _kernel_decorator
heuristics = _kernel_decorator


class Config:
    """``triton.Config`` as used in autotune lists: keeps its arguments."""

    def __init__(self, kwargs: dict[str, Any] | None = None, num_warps: int = 4, num_stages: int = 2,
                 **extra: Any) -> None:
        self.kwargs = dict(kwargs or {})
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.extra = extra


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


make_stand_in_package(sys.modules[__name__])
