#!/usr/bin/env bash
# GPU smoke check (bench/gpu_smoke.py says what it measures). Three uses:
#
#   bash bench/gpu_smoke.sh --fetch-wheels DIR           # here, with the registry: the wheels the GPU
#                                                       # machine lacks (bench/gpu_smoke_wheels.txt)
#   bash bench/gpu_smoke.sh --wheels DIR --out FILE      # on the GPU machine, no network: install
#                                                       # them into DIR/site-<python>, then run
#   bash bench/gpu_smoke.sh --dry-run --out FILE         # CPU, tiny shape, same code path (CI)
#
# Other arguments go to bench/gpu_smoke.py. The Python is $PYTHON, else the first of .venv/bin/python,
# python3, python that imports torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel_list="$root/bench/gpu_smoke_wheels.txt"
# The GPU machine's Python is not known here: every version torch 2.11 supports.
pythons_for_wheels=(3.10 3.11 3.12 3.13)

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  local candidate
  for candidate in "$root/.venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  echo "gpu_smoke.sh: no Python that imports torch (set PYTHON)" >&2
  exit 1
}

requirements() { grep -v '^\s*#' "$wheel_list" | grep -v '^\s*$'; }

fetch_wheels() {
  local dir="$1" python requirement version
  python="$(pick_python)"
  mkdir -p "$dir"
  # Installed copies from an earlier --wheels run here would travel too; they are rebuilt there.
  rm -rf "$dir"/site-*
  while read -r requirement; do
    # Binary wheels for every Python pyproject allows; a package without any is built here once
    # (it must come out pure Python: py3-none-any).
    local fetched=1
    for version in "${pythons_for_wheels[@]}"; do
      if ! "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
          --dest "$dir" --python-version "$version" --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
          "$requirement" 2>/dev/null; then
        fetched=0; break
      fi
    done
    if [[ "$fetched" == 0 ]]; then
      echo "gpu_smoke.sh: no binary wheel of $requirement for Python $version; building one" >&2
      "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$dir" "$requirement" \
        2> >(grep -v '^WARNING: Location' >&2)
      local name="${requirement%%==*}"
      if ! compgen -G "$dir/${name//-/_}-*-py3-none-any.whl" >/dev/null; then
        echo "gpu_smoke.sh: $requirement has no wheel and did not build a pure-Python one" >&2
        exit 1
      fi
    fi
  done < <(requirements)
  du -sh "$dir" | cut -f1 | sed "s|^|gpu_smoke.sh: wheels in $dir: |" >&2
}

install_wheels() {
  # Into DIR/site-<python tag>, once; pip without an index, or plain unzipping if there is no pip.
  local dir="$1" python="$2" tag target
  tag="$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  target="$dir/site-$tag"
  if [[ ! -f "$target/.installed" ]]; then
    rm -rf "$target"
    if "$python" -m pip --version >/dev/null 2>&1; then
      "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --find-links "$dir" \
        --target "$target" -r <(requirements) >&2
    else
      "$python" - "$dir" "$target" "$wheel_list" <<'PY'
import re, sys, zipfile
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
wheels, target, wanted = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
supported = list(sys_tags())
for line in wanted.read_text().splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
        continue
    name, version = line.strip().split("==")
    found = [w for w in wheels.glob("*.whl") if (lambda n, v, b, t: canonicalize_name(n) == canonicalize_name(name)
             and str(v) == version and set(t) & set(supported))(*parse_wheel_filename(w.name))]
    if not found:
        sys.exit(f"gpu_smoke.sh: no wheel of {line.strip()} for this Python in {wheels}")
    zipfile.ZipFile(found[0]).extractall(target)
PY
    fi
    touch "$target/.installed"
  fi
  echo "$target"
}

wheels="" passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fetch-wheels) fetch_wheels "${2:?--fetch-wheels needs a directory}"; exit 0 ;;
    --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
    *) passthrough+=("$1"); shift ;;
  esac
done

python="$(pick_python)"
if [[ -n "$wheels" ]]; then
  [[ -d "$wheels" ]] || { echo "gpu_smoke.sh: no wheel directory $wheels (fetch it with --fetch-wheels)" >&2; exit 1; }
  site="$(install_wheels "$(cd "$wheels" && pwd)" "$python")"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
echo "gpu_smoke.sh: $python bench/gpu_smoke.py ${passthrough[*]}" >&2
exec "$python" -W ignore bench/gpu_smoke.py "${passthrough[@]}"
