"""The Dockerfile lints clean and pins the same versions as pyproject.toml."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from rlsys.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is in requirements/cpu.lock; reinstall with scripts/ensure_venv.sh"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    pins = {}
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", spec)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_dockerfile_versions_match_pyproject():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))
    pins = _pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["SGLANG_VERSION"] == pins["sglang"]
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["TRANSFORMER_ENGINE_VERSION"] == pins["transformer-engine"]
    assert args["BASE_IMAGE"].endswith(f"v{pins['sglang']}-cu129")
