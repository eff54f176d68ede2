"""The Dockerfile lints clean, pins every version, and installs without re-resolving the base image.

No docker engine runs here, so the build itself is not exercised: what can drift silently is the
versions and the install lines. Every ``ARG NAME_VERSION`` must equal the pyproject pin of package
``name-version``'s name, the base image's tag must name the sglang version, and the apex source
must be one commit. Every ``pip install`` is ``--no-deps`` except Transformer Engine's (the one
documented exception, held to the installed versions by a constraint file); what rlsys needs on
top of the image comes from requirements/gpu.lock, whose entries are pinned, agree with cpu.lock
and pyproject.toml, leave out nothing rlsys requires that the image lacks, and are what
docker/gpu_lock.py derives today.
"""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rlsys.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
GPU_LOCK = REPO_ROOT / "requirements" / "gpu.lock"
CPU_LOCK = REPO_ROOT / "requirements" / "cpu.lock"
GPU_LOCK_TOOL = REPO_ROOT / "docker" / "gpu_lock.py"


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
    assert {"TORCH_VERSION", "SGLANG_VERSION", "TRANSFORMERS_VERSION", "TRANSFORMER_ENGINE_VERSION"} <= set(versions)
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


# ---------------------------------------------------------------- install lines and the GPU lock


def _gpu_lock_tool():
    spec = importlib.util.spec_from_file_location("gpu_lock", GPU_LOCK_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shell_commands() -> list[str]:
    """Each simple command of every RUN instruction (continuations joined, comments dropped)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    instructions = re.split(r"\n(?=[A-Z]+\s)", "\n".join(lines).replace("\\\n", " "))
    commands = []
    for instruction in instructions:
        if instruction.startswith("RUN "):
            commands += [c.strip() for c in re.split(r"&&|;|\|\|", instruction.removeprefix("RUN ")) if c.strip()]
    return commands


def _pip_installs() -> list[str]:
    return [c for c in _shell_commands() if re.search(r"\bpip3? install\b", c)]


def _lock(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", line)
            assert match, f"{path.name}: not pinned with ==: {line!r}"
            assert canonicalize_name(match.group(1)) not in entries, f"{path.name}: {line!r} twice"
            entries[canonicalize_name(match.group(1))] = match.group(2)
    return entries


def test_every_pip_install_is_no_deps_but_transformer_engine():
    installs = _pip_installs()
    # The lock, TE, apex and rlsys itself; a new install line must come with a decision here.
    assert len(installs) == 4, installs
    exceptions = [c for c in installs if "--no-deps" not in c.split()]
    assert len(exceptions) == 1 and '"transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}"' in exceptions[0], (
        f"every pip install must be --no-deps except Transformer Engine's: {exceptions}")
    # TE may add its own packages but not replace an installed one: the constraint file is the
    # `pip list --format=freeze` of the image taken just before.
    (te,) = exceptions
    constraint = re.search(r"--constraint (\S+)", te)
    assert constraint and f"pip list --format=freeze > {constraint.group(1)}" in _shell_commands(), te
    assert "--no-build-isolation" in te.split(), "TE's torch extension must build against the image's torch"


def test_the_lock_and_rlsys_are_what_gets_installed():
    installs = _pip_installs()
    assert any(c.split()[-2:] == ["-r", "requirements/gpu.lock"] for c in installs), installs
    assert "COPY requirements/gpu.lock ./requirements/gpu.lock" in DOCKERFILE.read_text()
    # An extra on rlsys's own line would mean nothing under --no-deps: the lock carries them.
    (own,) = [c for c in installs if c.split()[-2:] == ["-e", "."]]
    assert "--no-deps" in own.split(), own
    assert "python3 docker/gpu_lock.py --verify-installed" in _shell_commands()


def test_gpu_lock_pins_agree_with_cpu_lock_and_pyproject():
    gpu, cpu, pins = _lock(GPU_LOCK), _lock(CPU_LOCK), _pins()
    assert gpu, "requirements/gpu.lock is empty"
    for name, version in gpu.items():
        if name in cpu:
            assert version == cpu[name], f"gpu.lock {name}=={version}, cpu.lock {cpu[name]}"
        if name in pins:
            assert version == pins[name], f"gpu.lock {name}=={version}, pyproject.toml pins {pins[name]}"
        assert name in cpu or name in pins, f"gpu.lock {name}=={version} is pinned neither in cpu.lock nor pyproject"
    # torch and sglang are the base image's; TE is built by its own line.
    assert not {"torch", "sglang", "transformer-engine"} & set(gpu)
    assert gpu["torch-memory-saver"] == pins["torch-memory-saver"]


def test_gpu_lock_leaves_out_nothing_rlsys_requires_that_the_image_lacks():
    """Direct requirements here; docker/gpu_lock.py --check covers their whole closure."""
    tool = _gpu_lock_tool()
    gpu = _lock(GPU_LOCK)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + project["optional-dependencies"]["offline"]
    specs += project["optional-dependencies"]["gpu"]
    base = tool.provided("3.11")
    for spec in map(Requirement, specs):
        name = canonicalize_name(spec.name)
        if name == "transformer-engine":
            continue
        assert name in gpu or name in base, f"{spec} is in neither gpu.lock nor (by its metadata) the base image"
        if name in gpu:
            assert spec.specifier.contains(gpu[name], prereleases=True), f"gpu.lock {name}=={gpu[name]} breaks {spec}"


def test_gpu_lock_keeps_the_base_images_declared_requirements():
    """A locked version replaces the image's: it must satisfy what the image's packages (as far as
    .venv shows them: sglang 0.5.21's real metadata) declare about it."""
    tool = _gpu_lock_tool()
    gpu = _lock(GPU_LOCK)
    base = tool.provided("3.11")
    for distribution in importlib.metadata.distributions():
        owner = canonicalize_name(distribution.metadata["Name"])
        if owner not in base:
            continue
        for requirement in map(Requirement, distribution.requires or []):
            name = canonicalize_name(requirement.name)
            if name in gpu and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                assert requirement.specifier.contains(gpu[name], prereleases=True), (
                    f"{owner} requires {requirement}; gpu.lock has {name}=={gpu[name]}")


def test_gpu_lock_is_what_the_tool_derives():
    result = subprocess.run([sys.executable, str(GPU_LOCK_TOOL), "--check"], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.mark.parametrize(
    ("declared", "problems"),
    [
        (["megatron-core==0.16.1", 'sglang==0.5.21; extra == "gpu"', 'trl==1.16.0; extra == "bench"'], []),
        (["hydra-core==0.0.1"], ["hydra-core==0.0.1 is required, hydra-core 1.3.8 is installed"]),
        (['rlsys-no-such-package==1.0; extra == "offline"'],
         ['rlsys-no-such-package==1.0; extra == "offline" is not installed']),
    ],
)
def test_verify_installed_finds_missing_and_mismatched_requirements(declared, problems):
    """The image's last build step: it must fail on a missing package or a wrong version, and
    skip extras the image does not install (bench)."""
    assert _gpu_lock_tool().verify_installed(declared) == problems
