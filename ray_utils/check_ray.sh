#!/usr/bin/env bash
# Wait until the running Ray cluster has at least N GPUs (or N CPUs with --cpu).
#
#   bash ray_utils/check_ray.sh 16          # 16 GPUs
#   bash ray_utils/check_ray.sh 2 --cpu     # 2 CPUs (laptops, CI)
#
# Gives up after RAY_WAIT_TIMEOUT_S seconds (default 600) with the resources it saw.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: check_ray.sh N [--cpu]" >&2
  exit 2
fi
want="$1"
resource=GPU
[[ "${2:-}" == "--cpu" ]] && resource=CPU
timeout_s="${RAY_WAIT_TIMEOUT_S:-600}"
python_bin="${RLSYS_PYTHON_BIN:-python3}"

exec "$python_bin" - "$want" "$resource" "$timeout_s" <<'PY'
import sys, time
import ray

want, resource, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout_s
while True:
    have = int(ray.cluster_resources().get(resource, 0))
    if have >= want:
        print(f"check_ray.sh: {have} {resource}s registered (wanted {want})")
        sys.exit(0)
    if time.monotonic() > deadline:
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        print(f"check_ray.sh: only {have} {resource}s on {nodes} live nodes after {timeout_s:.0f}s (wanted {want})",
              file=sys.stderr)
        sys.exit(1)
    time.sleep(2)
PY
