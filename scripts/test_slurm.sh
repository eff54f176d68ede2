#!/usr/bin/env bash
# ray_utils/slurm_grpo.sbatch under a real SLURM on this machine: `make test-slurm` (as root; not
# part of `make test`).
#
# Installs SLURM and munge from the distribution's packages when they are missing (apt-get), writes
# a one-node cluster (this machine's CPUs and memory, one fake GPU: gres File=/dev/null) under a
# temporary directory, and starts munged (its own key and socket there), slurmctld and slurmd by
# hand on free ports. Then it submits the real batch script:
#   1. --gpus=1 with RLSYS_SLURM_DRY_RUN=1: a GPU count from --gpus reaches srun and check_ray.sh;
#   2. --gpus-per-node=1 --cpus-per-task=N with RAY_NUM_GPUS=1: a one-step run of the CPU config
#      on a GPU allocation (its log goes to the default logs/slurm/, which git ignores);
#   then the node's GPU gres is set to 0 and
#   3. --nodes=1 alone: the default config (4 nodes) is refused with exit status 2 before Ray starts;
#   4. --nodes=1 alone: a one-step run of the CPU config on a CPU allocation.
# Each run must exit 0, train one step and write its checkpoint, and stop Ray by SIGTERM (the
# nodes' drain messages in the log, no SIGKILL). Afterwards no process of these jobs (Ray, srun,
# slurmstepd) may be left. It stops exactly the daemons it started, and keeps the temporary
# directory (job logs, daemon logs) only when something failed.
#
# Environment: RLSYS_SLURM_TEST_KEEP=1 keeps the temporary directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started_at=$SECONDS

say() { echo "test_slurm.sh: $*"; }
fail() {
  echo "test_slurm.sh: FAILED: $*" >&2
  exit 1
}

[[ "$(id -u)" == 0 ]] || fail "needs root (slurmd runs the jobs, munged and slurmctld run as root); run: sudo make test-slurm"
[[ -x .venv/bin/python ]] || fail "no .venv; run make venv first"
python_bin="$root/.venv/bin/python"

# -- SLURM and munge ------------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin"
missing() {
  local cmd
  for cmd in sbatch srun scancel squeue sinfo scontrol slurmctld slurmd munged munge unmunge; do
    command -v "$cmd" >/dev/null || echo "$cmd"
  done | paste -sd ' ' -
}
if [[ -n "$(missing)" ]]; then
  command -v apt-get >/dev/null || fail "missing $(missing); install SLURM (slurmctld, slurmd, slurm-client) and munge with this distribution's packages"
  say "installing slurm-wlm and munge with apt-get (missing: $(missing))"
  # The packages' services must not start: this test runs daemons of its own, and stops only those.
  policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
  fi
  install_status=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } || install_status=$?
  [[ -z "$policy" ]] || rm -f "$policy"
  (( install_status == 0 )) || fail "apt-get install slurm-wlm munge failed (status $install_status)"
  [[ -z "$(missing)" ]] || fail "still missing after the install: $(missing)"
fi
slurm_version="$(sinfo --version 2>/dev/null || slurmctld -V)"

# -- a one-node cluster under a temporary directory ------------------------------------------------

free_ports() {
  "$python_bin" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Processes of this test's jobs: they carry its SLURM_CONF or RAY_TMPDIR in their environment (sbatch
# exports the submitter's environment to every job). Not counted: this script's own process tree,
# the daemons, and the helpers of munged and slurmctld (slurmscriptd); slurmd's children are the
# jobs' slurmstepd, and count.
job_processes() {
  "$python_bin" - "$SLURM_CONF" "$work/ray" "${pids[@]}" <<'PY'
import os, sys
import psutil
conf, ray_tmpdir, *daemons = sys.argv[1:]
markers = (f"SLURM_CONF={conf}".encode(), f"RAY_TMPDIR={ray_tmpdir}".encode())
skip = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
for pid in map(int, daemons):
    skip.add(pid)
    try:
        daemon = psutil.Process(pid)
        if daemon.name() != "slurmd":
            skip.update(child.pid for child in daemon.children(recursive=True))
    except psutil.Error:
        pass
for proc in psutil.process_iter(["pid", "cmdline"]):
    if proc.pid in skip:
        continue
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        continue
    if any(var in markers for var in environ):
        print(proc.pid, " ".join(proc.info["cmdline"] or [])[:160])
PY
}

stop_pid() {
  local pid="$1" _
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "test_slurm.sh: $pid did not stop on SIGTERM within 20 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

# Every job of this private cluster is one of this test's.
running_jobs() { squeue --noheader --format=%i 2>/dev/null | paste -sd ' ' -; }

cleanup() {
  local status=$? i pid ids _
  trap '' INT TERM
  if (( ${#pids[@]} >= 3 )) && [[ -n "$(running_jobs)" ]]; then
    echo "test_slurm.sh: cancelling jobs still queued or running: $(running_jobs)" >&2
    read -ra ids <<< "$(running_jobs)"
    scancel "${ids[@]}" 2>/dev/null || true
    for _ in $(seq 60); do
      [[ -n "$(running_jobs)" ]] || break
      sleep 1
    done
  fi
  # What a failed job left behind, by process id (the test has failed already).
  while read -r pid _; do
    [[ -z "$pid" ]] || kill -KILL "$pid" 2>/dev/null || true
  done < <(job_processes 2>/dev/null || true)
  for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do
    stop_pid "${pids[i]}"
  done
  if (( failed )) || [[ "${RLSYS_SLURM_TEST_KEEP:-0}" == 1 ]]; then
    echo "test_slurm.sh: logs kept in $work (job logs *.out, daemon logs in log/)" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}

pids=()            # the daemons this script started, in start order
failed=1
# Short, under /tmp: Ray's and munge's Unix sockets live below it (a 107-byte limit).
work="$(mktemp -d /tmp/rlslurm.XXXXXX)"
trap cleanup EXIT
# munged needs every directory above its socket searchable by all, and the key readable by it alone.
chmod 755 "$work"
mkdir -p "$work/etc" "$work/munge" "$work/key" "$work/spool/ctld" "$work/spool/d" "$work/log" "$work/ray"
chmod 700 "$work/key"
export SLURM_CONF="$work/etc/slurm.conf"
node="$(hostname -s)"
trap 'exit 130' INT
trap 'exit 143' TERM

read -r ctld_port slurmd_port ray_port_gpu ray_port_cpu <<< "$(free_ports 4)"
cpus="$(nproc)"
memory_mb="$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')"
cat > "$SLURM_CONF" <<EOF
# One-node test cluster of scripts/test_slurm.sh.
ClusterName=rlsystest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge/munge.socket
StateSaveLocation=$work/spool/ctld
SlurmdSpoolDir=$work/spool/d
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
PlugStackConfig=$work/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb Gres=gpu:1 State=UNKNOWN
PartitionName=rlsys Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "Name=gpu File=/dev/null" > "$work/etc/gres.conf"
: > "$work/etc/plugstack.conf"
dd if=/dev/urandom of="$work/key/munge.key" bs=1024 count=1 status=none
chmod 400 "$work/key/munge.key"

say "$slurm_version, node $node ($cpus CPUs, ${memory_mb} MB, gres gpu:1 on /dev/null), config in $work/etc"
munged --foreground --key-file="$work/key/munge.key" --socket="$work/munge/munge.socket" \
  --pid-file="$work/munge/munged.pid" --log-file="$work/log/munged.log" --seed-file="$work/munge/munged.seed" \
  > "$work/log/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 20); do
  [[ -S "$work/munge/munge.socket" ]] && break
  kill -0 "${pids[0]}" 2>/dev/null || fail "munged did not start: $(cat "$work/log/munged.out")"
  sleep 0.5
done
munge --socket="$work/munge/munge.socket" --no-input | unmunge --socket="$work/munge/munge.socket" >/dev/null ||
  fail "munged does not answer on $work/munge/munge.socket: $(cat "$work/log/munged.out")"
slurmctld -D -c -f "$SLURM_CONF" > "$work/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -N "$node" -f "$SLURM_CONF" > "$work/log/slurmd.out" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 60))
until [[ "$(sinfo --noheader --nodes="$node" --format=%T 2>/dev/null)" == idle ]]; do
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || fail "a daemon exited (pid $pid); see $work/log/"
  done
  (( SECONDS < deadline )) || fail "node $node not idle after 60 s: $(sinfo --noheader 2>&1); see $work/log/"
  sleep 1
done
say "munged, slurmctld, slurmd up (pids ${pids[*]}) after $((SECONDS - started_at)) s"

# -- the jobs ---------------------------------------------------------------------------------------
# The jobs run the project's environment; a short RAY_TMPDIR of their own and free ports keep them
# apart from any other Ray on this machine.
export PATH="$root/.venv/bin:$PATH" RAY_TMPDIR="$work/ray" RAY_HEAD_START_ARGS="--include-dashboard=false"
export RAY_WAIT_TIMEOUT_S=300 RAY_STOP_TIMEOUT_S=60
unset RAY_ADDRESS RAY_NUM_CPUS RAY_NUM_GPUS RLSYS_GPUS_PER_NODE RLSYS_CONFIG RLSYS_ROOT RLSYS_SLURM_DRY_RUN
one_step=(runner.total_steps=1 runner.prompts_per_step=2 rollout.n_samples=2 rollout.max_new_tokens=8
  rollout.max_total_tokens=2048 reward.num_workers=1 runner.val_interval=0 runner.save_interval=1
  runner.progress_bar=false)

# submit NAME EXPECTED_STATUS [sbatch options...] -- [script arguments...]: runs the batch script to
# its end (at most 15 minutes) and checks its exit status; sets job_id. Each job has an address
# file of its own under $work (the job ids of this private cluster are not unique on this machine).
submit() {
  local name="$1" expected="$2" options=() started=$SECONDS info state exit_code
  shift 2
  while [[ "$1" != -- ]]; do
    options+=("$1")
    shift
  done
  shift
  job_id="$(RAY_HEAD_ADDRESS_FILE="$work/ray-head-$name" sbatch --parsable --time=15 "${options[@]}" \
    ray_utils/slurm_grpo.sbatch "$@")" || fail "$name: sbatch refused the job"
  job_id="${job_id%%;*}"
  while [[ -n "$(squeue --noheader --jobs="$job_id" --format=%i 2>/dev/null)" ]]; do
    (( SECONDS - started < 960 )) || fail "$name: job $job_id still runs after 16 minutes"
    sleep 1
  done
  info="$(scontrol show job --oneliner "$job_id")"
  state="$(grep -o 'JobState=[A-Z_]*' <<< "$info")"
  exit_code="$(grep -o ' ExitCode=[0-9:]*' <<< "$info" | tr -d ' ')"
  say "$name: job $job_id ended, $state $exit_code, after $((SECONDS - started)) s"
  if [[ "$exit_code" != "ExitCode=$expected:0" ]]; then
    tail -n 60 "$work/$name.out" "logs/slurm/rlsys-grpo-$job_id.out" >&2 2>/dev/null || true
    fail "$name: job $job_id ended with $exit_code, wanted $expected:0"
  fi
}

# A run that trained one step and stopped its Ray by SIGTERM.
check_run() {
  local name="$1" log="$work/$1.out" output="$work/out-$1"
  grep -q '^\[rlsys\] step 1:' "$log" || fail "$name: no training step in $log"
  [[ -f "$output/checkpoints/step_00000001/COMPLETE" ]] || fail "$name: no complete checkpoint in $output/checkpoints"
  grep -q 'slurm_grpo.sbatch: stopping Ray: SIGTERM to step [0-9]*\.[0-9]' "$log" || fail "$name: the script did not signal the Ray step ($log)"
  grep -q 'start_ray.sh: SIGTERM received: draining node 0' "$log" || fail "$name: the Ray step got no SIGTERM ($log)"
  grep -q 'start_ray.sh: node 0 drained; Ray stopped after SIGTERM' "$log" || fail "$name: node 0 did not drain ($log)"
  grep -q 'slurm_grpo.sbatch: the Ray step ended' "$log" || fail "$name: the Ray step did not end ($log)"
  if grep -E -n 'forcing job termination|task [0-9]+: Killed|did not end within|Exited with exit code' "$log"; then
    fail "$name: Ray was killed, not drained ($log)"
  fi
  [[ ! -e "$work/ray-head-$name" ]] || fail "$name: the head's address file is left"
}

say "1/4 dry run, --gpus=1"
RLSYS_SLURM_DRY_RUN=1 submit dry-run-gpus 0 --nodes=1 --gpus=1 --output="$work/dry-run-gpus.out" -- \
  smollm2-135m-grpo-cpu
grep -q -- '^+ srun --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 ' "$work/dry-run-gpus.out" ||
  fail "dry run with --gpus=1: srun does not get --gpus-per-node=1: $(cat "$work/dry-run-gpus.out")"
grep -q -- '^+ bash ray_utils/check_ray.sh 1$' "$work/dry-run-gpus.out" ||
  fail "dry run with --gpus=1: check_ray.sh does not wait for 1 GPU: $(cat "$work/dry-run-gpus.out")"

say "2/4 one step of smollm2-135m-grpo-cpu on a GPU allocation (--gpus-per-node=1, fake gres)"
RAY_PORT="$ray_port_gpu" RAY_NUM_GPUS=1 submit gpu 0 --nodes=1 --gpus-per-node=1 --cpus-per-task="$cpus" -- \
  smollm2-135m-grpo-cpu "${one_step[@]}" "runner.output_dir=$work/out-gpu"
default_log="logs/slurm/rlsys-grpo-$job_id.out"
[[ -f "$default_log" ]] || fail "gpu: no job log at the default $default_log"
git check-ignore -q "$default_log" || fail "gpu: $default_log is not ignored by git"
mv "$default_log" "$work/gpu.out"
check_run gpu
grep -q 'check_ray.sh: 1 GPUs registered' "$work/gpu.out" || fail "gpu: check_ray.sh did not count the GPU"

scontrol update NodeName="$node" Gres=gpu:0
say "node $node now has no GPU gres"

say "3/4 --nodes=1 with the default config (4 nodes): refused"
submit refused 2 --nodes=1 --output="$work/refused.out" --
grep -q "the allocation has 1 node(s) but config 'qwen2.5-7b-grpo-megatron' has cluster.num_nodes=4" "$work/refused.out" ||
  fail "refused: no message naming both node counts: $(cat "$work/refused.out")"
if grep -q 'starting Ray' "$work/refused.out"; then fail "refused: Ray was started"; fi

say "4/4 one step of smollm2-135m-grpo-cpu on a CPU allocation (--nodes=1)"
RAY_PORT="$ray_port_cpu" submit cpu 0 --nodes=1 --output="$work/cpu.out" -- \
  smollm2-135m-grpo-cpu "${one_step[@]}" "runner.output_dir=$work/out-cpu"
check_run cpu
if grep 'starting Ray' "$work/cpu.out" | grep -q -- '--gpus'; then fail "cpu: srun got a GPU option"; fi
grep -q "check_ray.sh: $cpus CPUs registered" "$work/cpu.out" || fail "cpu: check_ray.sh did not count the node's CPUs"

# -- nothing of the jobs is left ---------------------------------------------------------------------
deadline=$((SECONDS + 30))
while [[ -n "$(job_processes)" ]] && (( SECONDS < deadline )); do
  sleep 1
done
left="$(job_processes)"
[[ -z "$left" ]] || fail "processes of the jobs are left:"$'\n'"$left"
failed=0
say "passed in $((SECONDS - started_at)) s ($slurm_version): CPU and GPU allocations ran one step each, Ray stopped by SIGTERM; nothing left"
