#!/usr/bin/env bash
# Start this node's Ray daemon: the head when RANK=0, a worker otherwise.
#
#   RANK=0 bash ray_utils/start_ray.sh     # on the first node
#   RANK=1 bash ray_utils/start_ray.sh     # on every other node, in any order
#
# The head writes "IP:PORT TOKEN" to RAY_HEAD_ADDRESS_FILE, which must be on storage every node
# sees. A worker waits (at most RAY_WAIT_TIMEOUT_S seconds) until that file carries the worker's
# own token and something answers at the address, then joins. The token (by default the SLURM job
# id) keeps a worker from joining the head of another job whose file was left behind; the answer
# check skips a file whose head is gone. The head deletes any old file before it starts.
#
# Environment:
#   RANK                    node rank, 0 for the head (SLURM_NODEID is used when RANK is unset)
#   RAY_PORT                the head's port (default 6379)
#   RAY_HEAD_ADDRESS_FILE   default: $PWD/.ray_head_address.${SLURM_JOB_ID:-local}
#   RAY_CLUSTER_TOKEN       one word shared by the nodes of one cluster (default: $SLURM_JOB_ID,
#                           else "local")
#   RAY_WAIT_TIMEOUT_S      how long a worker waits for the head (default 600)
#   RAY_NODE_IP             this node's IP (default: the address Ray itself picks)
#   RAY_NUM_CPUS, RAY_NUM_GPUS   resources to advertise (default: what Ray detects)
#   RAY_BLOCK=1             stay in the foreground while Ray runs, for srun steps and containers;
#                           a SIGTERM (or SIGINT) to this script then drains and stops the node,
#                           and the script exits 0 once Ray is down. Default: start and return.
#   RAY_START_ARGS          more `ray start` arguments for every node, e.g. "--object-store-memory=..."
#   RAY_HEAD_START_ARGS     more for the head only, e.g. "--include-dashboard=false"
#   RAY_TMPDIR              Ray's own variable: where its sessions, logs and sockets go (default /tmp)
#   RAY_AUTH_MODE           Ray's own variable: "disabled" (default here) or "token"; every node and
#                           every driver needs the same one, and with "token" the same token
#                           (~/.ray/auth_token on a shared home, or RAY_AUTH_TOKEN)
#   RLSYS_PYTHON_BIN        the Python that has ray installed (default: python3)
# Exit status: 0 started (or, with RAY_BLOCK=1, Ray ran and stopped), 1 Ray did not start or no
# head answered in time, 2 bad usage.
set -euo pipefail

die() {
  local status="$1"
  shift
  echo "start_ray.sh: $*" >&2
  exit "$status"
}

rank="${RANK:-${SLURM_NODEID:-}}"
[[ "$rank" =~ ^[0-9]+$ ]] || die 2 "set RANK to this node's rank (0 for the head node), got '$rank'"
port="${RAY_PORT:-6379}"
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
  die 2 "RAY_PORT must be a port number (1-65535), got '$port'"
fi
timeout_s="${RAY_WAIT_TIMEOUT_S:-600}"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die 2 "RAY_WAIT_TIMEOUT_S must be whole seconds, got '$timeout_s'"
address_file="${RAY_HEAD_ADDRESS_FILE:-$PWD/.ray_head_address.${SLURM_JOB_ID:-local}}"
token="${RAY_CLUSTER_TOKEN:-${SLURM_JOB_ID:-local}}"
[[ "$token" =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "RAY_CLUSTER_TOKEN must be one word of letters, digits, '.', '_' or '-', got '$token'"
block="${RAY_BLOCK:-0}"
[[ "$block" == 0 || "$block" == 1 ]] || die 2 "RAY_BLOCK must be 0 or 1, got '$block'"
python_bin="${RLSYS_PYTHON_BIN:-python3}"
# Left unset, a Ray 2.60 head turns token authentication on by itself whenever ~/.ray/auth_token
# exists (any local ray.init() writes one), while workers and drivers only send a token when
# RAY_AUTH_MODE=token: they are then refused. An explicit mode keeps all nodes in agreement.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
command -v ray >/dev/null || die 1 "no 'ray' command on PATH; activate the environment rlsys is installed in"

args=(--disable-usage-stats)
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus "$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus "$RAY_NUM_GPUS")
if [[ -n "${RAY_START_ARGS:-}" ]]; then
  read -ra extra <<< "$RAY_START_ARGS"
  args+=("${extra[@]}")
fi
head_args=()
if [[ -n "${RAY_HEAD_START_ARGS:-}" ]]; then
  read -ra head_args <<< "$RAY_HEAD_START_ARGS"
fi

# Whether something accepts TCP connections at $1 (IP:PORT). Plain sockets, because a Ray client
# pointed at a dead address retries for minutes before it fails.
answers() {
  "$python_bin" -c 'import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()' "$1" 2>/dev/null
}

# RAY_BLOCK=1: `ray start --block` never returns while Ray runs, so it runs in the background
# (its pid in ray_pid) and this script waits for it. A TERM or INT is passed on to it: Ray then
# drains the node and stops its processes.
stop_signal=""
start_blocking() {
  "$@" --block &
  ray_pid=$!
  trap 'forward_stop TERM' TERM
  trap 'forward_stop INT' INT
}
forward_stop() {
  [[ -n "$stop_signal" ]] && return
  stop_signal="$1"
  echo "start_ray.sh: SIG$1 received: draining node $rank and stopping its Ray"
  kill -TERM "$ray_pid" 2>/dev/null || true
}
# Waits for Ray to end and exits: 0 when a signal asked it to stop (Ray itself exits 1 after a
# SIGTERM), else Ray's own status.
wait_blocking() {
  local status=0
  wait "$ray_pid" || status=$?
  # A trapped signal ends `wait` early; these wait for Ray's own shutdown.
  while kill -0 "$ray_pid" 2>/dev/null; do
    status=0
    wait "$ray_pid" || status=$?
  done
  if [[ -n "$stop_signal" ]]; then
    echo "start_ray.sh: node $rank drained; Ray stopped after SIG$stop_signal"
    exit 0
  fi
  exit "$status"
}

if (( 10#$rank == 0 )); then
  # Ray's own choice of this node's address (hostname -I is Linux-only); its --node-ip-address
  # gets the same value, so the file names exactly the address the head listens on.
  node_ip="${RAY_NODE_IP:-$("$python_bin" -c 'import ray.util; print(ray.util.get_node_ip_address())')}"
  [[ -n "$node_ip" ]] || die 1 "could not find this node's IP; set RAY_NODE_IP"
  address="$node_ip:$port"
  mkdir -p "$(dirname "$address_file")"
  rm -f "$address_file"
  head_cmd=(ray start --head --port "$port" --node-ip-address "$node_ip" "${args[@]}")
  (( ${#head_args[@]} )) && head_cmd+=("${head_args[@]}")
  # Written under a temporary name and renamed into place, so a worker never reads half a line.
  publish() {
    printf '%s %s\n' "$address" "$token" > "$address_file.tmp.$$"
    mv -f "$address_file.tmp.$$" "$address_file"
    echo "start_ray.sh: head at $address (address in $address_file, token $token)"
  }

  if (( block )); then
    # The address is published once the head answers, and the file goes away with the head.
    start_blocking "${head_cmd[@]}"
    trap 'rm -f "$address_file" "$address_file.tmp.$$"' EXIT
    deadline=$((SECONDS + timeout_s))
    until answers "$address"; do
      [[ -n "$stop_signal" ]] && wait_blocking
      if ! kill -0 "$ray_pid" 2>/dev/null; then
        wait "$ray_pid" || true
        die 1 "ray start --head failed (its output is above)"
      fi
      if (( SECONDS >= deadline )); then
        kill -TERM "$ray_pid" 2>/dev/null || true
        die 1 "the head did not answer at $address within ${timeout_s}s"
      fi
      sleep 1
    done
    publish
    wait_blocking
  fi
  "${head_cmd[@]}" || die 1 "ray start --head failed (its output is above)"
  publish
else
  echo "start_ray.sh: worker $rank waits up to ${timeout_s}s for the head's address in $address_file (token $token)"
  deadline=$((SECONDS + timeout_s))
  while :; do
    head="" file_token=""
    if [[ -s "$address_file" ]]; then
      read -r head file_token < "$address_file" || true
    fi
    if [[ -n "$head" && "$file_token" == "$token" ]] && answers "$head"; then
      break
    fi
    if (( SECONDS >= deadline )); then
      if [[ -z "$head" ]]; then
        die 1 "no head address in $address_file after ${timeout_s}s; is the RANK=0 node up, and does this node see that file?"
      elif [[ "$file_token" != "$token" ]]; then
        die 1 "$address_file carries token '$file_token', not this cluster's '$token', after ${timeout_s}s (a file left by another job? set RAY_CLUSTER_TOKEN alike on every node)"
      fi
      die 1 "nothing answers at $head (from $address_file) after ${timeout_s}s; the head is down"
    fi
    sleep 1
  done
  worker_cmd=(ray start --address "$head" "${args[@]}")
  [[ -n "${RAY_NODE_IP:-}" ]] && worker_cmd+=(--node-ip-address "$RAY_NODE_IP")
  if (( block )); then
    echo "start_ray.sh: worker $rank joins $head and blocks while Ray runs"
    start_blocking "${worker_cmd[@]}"
    wait_blocking
  fi
  "${worker_cmd[@]}" || die 1 "ray start --address $head failed (its output is above)"
  echo "start_ray.sh: worker $rank joined $head"
fi
