#!/usr/bin/env bash
# Installs the `bench` extra (requirements/bench.lock: TRL and its needs) into .venv-bench-site,
# a plain directory that bench/bench_e2e_trl.py puts on sys.path after .venv's own packages.
# --no-deps --target: nothing in .venv changes, so `make test` never sees TRL.
# Quick when nothing changed: skipped while the stamp (a hash of the lock) matches.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_venv.sh"
site="$root/.venv-bench-site"
stamp="$site/.rlsys-bench-stamp"
want="$(sha256sum "$root/requirements/bench.lock" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[rlsys] installing the bench extra into $site" >&2
rm -rf "$site"
log="$(mktemp)"
if ! "$root/.venv/bin/python" -m pip --disable-pip-version-check install --no-deps --target "$site" \
    -r "$root/requirements/bench.lock" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
  echo "[rlsys] pip install of requirements/bench.lock failed; log: $log" >&2
  exit 1
fi
rm -f "$log"
echo "$want" > "$stamp"
echo "[rlsys] bench extra installed in $site" >&2
