#!/usr/bin/env bash
# Start this node's Ray daemon: the head when RANK=0, a worker otherwise.
#
#   RANK=0 bash ray_utils/start_ray.sh     # on the first node
#   RANK=1 bash ray_utils/start_ray.sh     # on every other node
#
# The head writes its address to RAY_HEAD_ADDRESS_FILE, which must be on storage every node
# sees; workers wait for that file (at most RAY_WAIT_TIMEOUT_S seconds) and join.
# Environment:
#   RANK                    node rank (SLURM_NODEID is used when RANK is unset)
#   RAY_PORT                head port (default 6379)
#   RAY_HEAD_ADDRESS_FILE   default: $PWD/.ray_head_address.${SLURM_JOB_ID:-local}
#   RAY_WAIT_TIMEOUT_S      how long a worker waits for the head (default 600)
#   RAY_NODE_IP             this node's IP (default: first address of `hostname -I`)
#   RAY_NUM_CPUS, RAY_NUM_GPUS   resources to advertise (default: what Ray detects)
set -euo pipefail
rank="${RANK:-${SLURM_NODEID:-}}"
if [[ -z "$rank" ]]; then
  echo "start_ray.sh: set RANK (0 for the head node)" >&2
  exit 2
fi
port="${RAY_PORT:-6379}"
address_file="${RAY_HEAD_ADDRESS_FILE:-$PWD/.ray_head_address.${SLURM_JOB_ID:-local}}"
timeout_s="${RAY_WAIT_TIMEOUT_S:-600}"
node_ip="${RAY_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
node_ip="${node_ip:-127.0.0.1}"
resources=()
[[ -n "${RAY_NUM_CPUS:-}" ]] && resources+=(--num-cpus "$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && resources+=(--num-gpus "$RAY_NUM_GPUS")

if [[ "$rank" == "0" ]]; then
  rm -f "$address_file"
  ray start --head --port "$port" --node-ip-address "$node_ip" --disable-usage-stats "${resources[@]}"
  # Written last and renamed into place, so a worker never reads half an address.
  echo "$node_ip:$port" > "$address_file.tmp.$$"
  mv "$address_file.tmp.$$" "$address_file"
  echo "start_ray.sh: head at $node_ip:$port (address in $address_file)"
else
  waited=0
  until [[ -s "$address_file" ]]; do
    if (( waited >= timeout_s )); then
      echo "start_ray.sh: no head address in $address_file after ${timeout_s}s; is the RANK=0 node up?" >&2
      exit 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
  head="$(cat "$address_file")"
  ray start --address "$head" --node-ip-address "$node_ip" --disable-usage-stats "${resources[@]}"
  echo "start_ray.sh: worker $rank joined $head"
fi
