#!/usr/bin/env bash
# Wait until the running Ray cluster has at least N GPUs (or N CPUs with --cpu).
#
#   bash ray_utils/check_ray.sh 16          # 16 GPUs
#   bash ray_utils/check_ray.sh 2 --cpu     # 2 CPUs (laptops, CI)
#
# Connects as `ray.init(address="auto")` does: to RAY_ADDRESS when it is set, else to the cluster
# started on this machine. Gives up after RAY_WAIT_TIMEOUT_S seconds (default 600), naming the
# resources and nodes it saw. RLSYS_PYTHON_BIN is the Python that has ray (default: python3).
# RAY_AUTH_MODE defaults to "disabled", as in start_ray.sh; set it as the cluster's nodes have it.
# Exit status: 0 enough resources, 1 not within the timeout (or no cluster), 2 bad usage.
set -euo pipefail
usage() {
  echo "usage: check_ray.sh N [--cpu]   (wait for N GPUs, or N CPUs with --cpu)" >&2
  exit 2
}
[[ $# -ge 1 && $# -le 2 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
resource=GPU
if [[ $# -eq 2 ]]; then
  [[ "$2" == "--cpu" ]] || usage
  resource=CPU
fi
timeout_s="${RAY_WAIT_TIMEOUT_S:-600}"
if ! [[ "$timeout_s" =~ ^[0-9]+$ ]]; then
  echo "check_ray.sh: RAY_WAIT_TIMEOUT_S must be whole seconds, got '$timeout_s'" >&2
  exit 2
fi
python_bin="${RLSYS_PYTHON_BIN:-python3}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

exec "$python_bin" - "$1" "$resource" "$timeout_s" <<'PY'
import os
import socket
import sys
import time

import ray

want, resource, timeout_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + timeout_s
address = os.environ.get("RAY_ADDRESS") or "auto"


def give_up(message: str) -> None:
    print(f"check_ray.sh: {message}", file=sys.stderr)
    sys.exit(1)


def answers(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except OSError:
        return False


# A Ray client pointed at a dead address retries for minutes, so a plain socket waits for the head
# first; with "auto", ray.init fails at once while no cluster runs here, and is simply retried.
if address != "auto" and "://" not in address:
    while not answers(address):
        if time.monotonic() > deadline:
            give_up(f"nothing answers at RAY_ADDRESS={address} after {timeout_s}s; is the head node up?")
        time.sleep(1)
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        break
    except ConnectionError as exc:
        ray.shutdown()
        if time.monotonic() > deadline:
            give_up(f"no Ray cluster to connect to after {timeout_s}s ({exc})")
        time.sleep(2)

while True:
    have = int(ray.cluster_resources().get(resource, 0))
    if have >= want:
        print(f"check_ray.sh: {have} {resource}s registered (wanted {want})")
        sys.exit(0)
    if time.monotonic() > deadline:
        live = [n for n in ray.nodes() if n["Alive"]]
        per_node = ", ".join(f"{n['NodeManagerAddress']}: {int(n['Resources'].get(resource, 0))}" for n in live)
        give_up(f"only {have} {resource}s on {len(live)} live node(s) after {timeout_s}s (wanted {want}); "
                f"{resource}s per node: {per_node or 'none'}")
    time.sleep(1)
PY
