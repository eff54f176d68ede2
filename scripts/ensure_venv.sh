#!/usr/bin/env bash
# Creates or refreshes the project-local virtual environment at .venv.
# Quick when nothing changed: the install is skipped while the stamp (a hash of the lock and
# pyproject.toml) matches. Prints nothing in that case.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.rlsys-install-stamp"
want="$(cat "$root/requirements/cpu.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

python_bin="${RLSYS_PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "rlsys needs Python 3.11; found $("$python_bin" --version 2>&1). Set RLSYS_PYTHON." >&2
  exit 1
fi

echo "[rlsys] installing into $venv (first run takes about two minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
log="$venv/install.log"
: > "$log"
run_pip() {
  if ! "${pip[@]}" "$@" >>"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
    echo "[rlsys] pip $* failed; full log: $log" >&2
    exit 1
  fi
}
# A fresh venv's setuptools is too old to build torch-era packages.
run_pip install "setuptools>=77"
# --no-deps: the lock is complete; see its header for why the resolver must not run.
run_pip install --no-deps -r "$root/requirements/cpu.lock"
run_pip install --no-deps --no-build-isolation -e "$root"
echo "$want" > "$stamp"
echo "[rlsys] installed; log in $log" >&2
