"""Run SGLang's rollout engine on CPU: every CPU workaround for sglang, and only here.

Checked against sglang 0.5.21, torch 2.13.0 (CPU build) and transformers 5.12.1. Re-check every
item below when any of them moves.

Where it applies. Only in sglang's own processes, and only when the engine's device is ``"cpu"``:
rlsys never imports sglang in the trainer. ``rlsys.rollout.sglang_engine`` starts its worker process
with ``sglang_process_env()`` and builds the engine arguments with ``engine_args_for_device()``;
sglang's scheduler and detokenizer processes inherit the worker's environment and ``sys.path``.
So the stand-in packages never shadow a real package in the trainer, and on GPU nothing here is
used at all (``engine_args_for_device`` passes GPU arguments through unchanged and
``sglang_process_env`` is only called for CPU engines).

The workarounds, and why each is needed:

1. ``SGLANG_USE_CPU_ENGINE=1``. sglang's ``is_cpu()`` is true only with it; it selects the CPU code
   paths (KV pool in host memory, torch-native ops, CPU thread binding).
2. Engine arguments (``CPU_REQUIRED_ENGINE_ARGS``): ``attention_backend="torch_native"`` (the one
   attention backend without GPU kernels), ``disable_cuda_graph=True``, and ``grammar_backend="none"``
   (the documented way to keep xgrammar, and with it Triton, out of engine start). Defaults
   (``CPU_DEFAULT_ENGINE_ARGS``, a caller may override them): ``dtype="float32"``, because bf16
   matmuls are slow on CPUs without AMX and greedy ids match HF's fp32 model exactly only in fp32;
   ``max_total_tokens`` because sglang otherwise sizes the KV pool as about 95 % of *host* memory.
3. Stand-in packages (folder ``sglang_cpu_shims/``, put first on ``PYTHONPATH`` of sglang processes):

   * ``triton``: imported unconditionally by ``sglang/srt/utils/common.py`` and by about 300 kernel
     modules; the real package is a 1 GB CUDA toolchain. sglang ships its own stub
     (``sglang/_platform_stubs.py``) but installs it only on macOS. torch, too, then believes
     Triton is installed (``torch.utils._triton.has_triton_package``), so ``torch.compile`` must
     stay off in these processes; with CUDA graphs disabled sglang does not turn it on.
   * ``torchvision``: the registry's wheel is CUDA-linked and fails to load with CPU torch.
     ``sglang.srt.configs.deepseek_ocr`` imports ``torchvision.transforms`` at module level, and
     transformers defines ``AutoImageProcessor`` (which sglang's multimodal configs register against
     at import) only when it finds a torchvision.
   * ``sgl_kernel``: sglang-kernel ships CUDA builds only. CPU mode imports seven names at module
     level (two for KV-cache bookkeeping, five for speculative decoding); none is called when
     generating without speculative decoding. Each stand-in raises if it ever is.
   * ``xgrammar``, ``soundfile``, ``python_multipart``: needed only by sglang's HTTP server
     (``sglang.launch_server``), not by the offline engine. Its function-call parsers declare
     pydantic models with xgrammar types at import; its OpenAI transcription route imports
     soundfile; FastAPI refuses to register form routes without python-multipart. Rollout uses none
     of them. (soundfile and python-multipart are ordinary pure-Python packages that the CPU lock
     does not include; with them installed, their stand-ins could go.)

   The folder also holds ``sitecustomize.py``, which Python runs at the start of each of these
   processes: it installs ``rlsys.platform.quiet``'s filters of the warnings that only restate
   these CPU fallbacks (sglang spawns its scheduler and detokenizer, so nothing set in the worker's
   own interpreter reaches them).

   ``assert_stand_ins_active()`` checks, inside an sglang process, that the stand-ins really were
   the packages imported, and ``warn_if_unchecked_version()`` warns when the installed sglang is not
   the version all of this was checked against.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHECKED_SGLANG_VERSION = "0.5.21"

SHIM_DIR = Path(__file__).resolve().parent / "sglang_cpu_shims"
"""Folder holding the stand-in packages; it must come first on the path of sglang processes."""

STAND_IN_PACKAGES = ("triton", "torchvision", "sgl_kernel", "xgrammar", "soundfile", "python_multipart")

CPU_ENGINE_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}

CPU_REQUIRED_ENGINE_ARGS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "disable_cuda_graph": True,
    "grammar_backend": "none",
}
"""sglang engine arguments without which sglang cannot run on CPU."""

CPU_DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_total_tokens": 32_768,
    "sleep_on_idle": True,
}
"""CPU defaults a caller may override. 32k KV slots cover a rollout batch of, e.g., 64 × 512 tokens.
``sleep_on_idle``: an idle scheduler otherwise polls in a busy loop and takes a whole core from
the colocated actor while it trains; sleeping waits on the request sockets, so a request still
wakes it at once."""


def is_cpu_device(device: str) -> bool:
    return device == "cpu" or device.startswith("cpu:")


def engine_args_for_device(device: str, requested: Mapping[str, Any]) -> dict[str, Any]:
    """sglang ``Engine``/``ServerArgs`` keyword arguments for ``device``.

    On CPU: ``requested`` plus the required CPU settings and the CPU defaults it does not set.
    A requested value that contradicts a required one is an error (it would fail later inside a
    child process, far from its cause). On any other device ``requested`` is returned unchanged.
    """
    args = {key: value for key, value in requested.items() if value is not None}
    if not is_cpu_device(device):
        return {"device": device, **args}
    for key, required in CPU_REQUIRED_ENGINE_ARGS.items():
        if key in args and args[key] != required:
            raise ValueError(f"sglang on CPU needs {key}={required!r}, got {args[key]!r}")
    with_defaults = {**CPU_DEFAULT_ENGINE_ARGS, **args, **CPU_REQUIRED_ENGINE_ARGS}
    if "mem_fraction_static" in args and "max_total_tokens" not in args:
        # The caller sized the KV pool as a fraction of memory; don't cap it with our default.
        del with_defaults["max_total_tokens"]
    return with_defaults


def sglang_process_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that runs sglang on CPU: ``base`` (default: this process's
    environment) with ``SGLANG_USE_CPU_ENGINE=1`` and the stand-in folder first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(CPU_ENGINE_ENV)
    existing = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != str(SHIM_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), *existing])
    return env


def server_command_line(engine_args: Mapping[str, Any], *, host: str, port: int) -> list[str]:
    """Arguments of ``python -m sglang.launch_server`` for the same settings as ``engine_args``
    (``ServerArgs`` field names; ``True`` becomes a bare flag, ``False`` and ``None`` are left out)."""
    args = ["--host", host, "--port", str(port)]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args.extend([flag, str(value)])
    return args


def warn_if_unchecked_version(installed: str) -> None:
    if installed != CHECKED_SGLANG_VERSION:
        warnings.warn(
            f"sglang {installed} runs on CPU with workarounds checked against {CHECKED_SGLANG_VERSION}; "
            "re-check rlsys/platform/sglang_cpu.py",
            stacklevel=2,
        )


def assert_stand_ins_active() -> None:
    """Inside an sglang process on CPU: fail unless every stand-in package resolves to ``SHIM_DIR``.

    A real ``triton`` or ``torchvision`` earlier on the path would fail much later with an
    unrelated-looking error; this names the cause at start instead.
    """
    import importlib.util

    misplaced = []
    for name in STAND_IN_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or SHIM_DIR not in origin.parents:
            misplaced.append(f"{name} -> {origin}")
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        misplaced.append("SGLANG_USE_CPU_ENGINE is not 1")
    if misplaced:
        raise RuntimeError(
            "this process runs sglang on CPU but was not started with sglang_process_env(): "
            + "; ".join(misplaced)
        )
