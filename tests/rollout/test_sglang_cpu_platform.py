"""Risks: the CPU workarounds for sglang leak into the trainer, or misconfigure an sglang process.

- CPU engine arguments carry the required settings and refuse contradicting ones; GPU arguments
  pass through untouched.
- ``sglang_process_env`` puts the stand-ins first on the path of a child process only; there the
  stand-ins are the packages imported, kernels refuse to launch, and ``assert_stand_ins_active``
  passes, while in a process started without that environment it names what is wrong.
(That SGLangEngine's trainer process never imports sglang is checked in test_sglang_engine.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from rlsys.platform import sglang_cpu


def test_cpu_engine_args_add_required_settings_and_keep_caller_values() -> None:
    args = sglang_cpu.engine_args_for_device("cpu", {"model_path": "m", "dtype": "bfloat16", "tp_size": None})
    assert args == {
        "model_path": "m",
        "dtype": "bfloat16",
        "max_total_tokens": sglang_cpu.CPU_DEFAULT_ENGINE_ARGS["max_total_tokens"],
        "sleep_on_idle": True,
        **sglang_cpu.CPU_REQUIRED_ENGINE_ARGS,
    }
    sized_by_fraction = sglang_cpu.engine_args_for_device("cpu", {"mem_fraction_static": 0.1})
    assert "max_total_tokens" not in sized_by_fraction
    with pytest.raises(ValueError, match="attention_backend='torch_native'"):
        sglang_cpu.engine_args_for_device("cpu", {"attention_backend": "flashinfer"})


def test_gpu_engine_args_pass_through() -> None:
    requested = {"model_path": "m", "attention_backend": "fa3", "mem_fraction_static": 0.7}
    assert sglang_cpu.engine_args_for_device("cuda", requested) == {"device": "cuda", **requested}


def test_server_command_line_spells_server_flags() -> None:
    line = sglang_cpu.server_command_line(
        {"model_path": "/m", "disable_cuda_graph": True, "enable_metrics": False, "max_total_tokens": 8},
        host="127.0.0.1", port=30000,
    )
    assert line == ["--host", "127.0.0.1", "--port", "30000", "--model-path", "/m", "--disable-cuda-graph",
                    "--max-total-tokens", "8"]


_PROBE = textwrap.dedent("""
    import sys
    from rlsys.platform import sglang_cpu
    sglang_cpu.assert_stand_ins_active()
    import triton, triton.language as tl, torchvision.transforms, sgl_kernel, xgrammar, soundfile

    @triton.jit
    def kernel(x, BLOCK: tl.constexpr):
        pass

    for launch in (lambda: kernel[(1,)](0, BLOCK=4), lambda: sgl_kernel.copy_all_layer_kv_cache_cpu()):
        try:
            launch()
        except RuntimeError as error:
            print("refused:", str(error).split(",")[0])
    print(triton.cdiv(7, 2), triton.next_power_of_2(5), torchvision.transforms.InterpolationMode.BICUBIC)
""")


def test_stand_ins_are_active_only_in_processes_given_the_environment() -> None:
    assert str(sglang_cpu.SHIM_DIR) not in sys.path
    env = sglang_cpu.sglang_process_env({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(sglang_cpu.SHIM_DIR), "/elsewhere"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"

    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[:2] == [
        "refused: Triton kernel 'kernel' was launched",
        "refused: sgl_kernel.copy_all_layer_kv_cache_cpu (KV-cache copy between slots) was called",
    ]
    assert probe.stdout.splitlines()[2].startswith("4 8 ")

    plain_env = {key: value for key, value in env.items() if key not in ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE")}
    unprepared = subprocess.run([sys.executable, "-c", _PROBE], env=plain_env, capture_output=True, text=True,
                                timeout=120)
    assert unprepared.returncode != 0
    assert "was not started with sglang_process_env()" in unprepared.stderr
    assert "SGLANG_USE_CPU_ENGINE is not 1" in unprepared.stderr
