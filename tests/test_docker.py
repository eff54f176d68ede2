"""The Dockerfile lints clean and pins every version, each equal to pyproject.toml's pin.

No docker engine runs here, so the build itself is not exercised: what can drift silently is the
versions. Every ``ARG NAME_VERSION`` must equal the pyproject pin of package ``name-version``'s
name, the base image's tag must name the sglang version, and the apex source must be one commit.
"""

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
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _args() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    bare = re.findall(r"^ARG (\w+)\s*$", text, flags=re.M)
    assert not bare, f"{DOCKERFILE}: ARG without a default (unpinned): {bare}"
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))


def test_every_version_arg_equals_the_pyproject_pin():
    args, pins = _args(), _pins()
    versions = {name: value for name, value in args.items() if name.endswith("_VERSION")}
    # The stack the image exists for; a renamed ARG must not drop out of the check unnoticed.
    assert {"TORCH_VERSION", "SGLANG_VERSION", "MEGATRON_CORE_VERSION", "TRANSFORMER_ENGINE_VERSION"} <= set(versions)
    for name, value in versions.items():
        package = name.removesuffix("_VERSION").lower().replace("_", "-")
        assert package in pins, f"{DOCKERFILE}: ARG {name} has no '{package}==' pin in pyproject.toml"
        assert value == pins[package], f"{DOCKERFILE}: ARG {name}={value}, pyproject.toml pins {package}=={pins[package]}"


def test_base_image_and_apex_are_fixed():
    args, pins = _args(), _pins()
    assert re.fullmatch(rf"lmsysorg/sglang:v{re.escape(pins['sglang'])}-cu\d+", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    # A branch or tag name can move; a full commit id cannot.
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"]), f"APEX_COMMIT must be a full commit id: {args['APEX_COMMIT']}"
    assert args["INSTALL_APEX"] in ("0", "1")
    instructions = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert '"${APEX_COMMIT}"' in instructions, "the apex build must fetch APEX_COMMIT"
    moving = re.findall(r"\S*(?::latest\b|\b(?:master|main)\b)\S*", instructions)
    assert not moving, f"{DOCKERFILE}: references that move over time: {moving}"
