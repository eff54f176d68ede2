#!/usr/bin/env bash
# The main job: bash examples/reasoning/run_main_grpo_math.sh [CONFIG] [key=value ...]
#
# CONFIG is an experiment file under configs/ (default: the offline CPU default,
# smollm2-135m-grpo-cpu). An unknown name lists the available ones.
# On a laptop or CI machine the first run installs everything into .venv at the repository
# root; set RLSYS_USE_CURRENT_PYTHON=1 to use the interpreter already on PATH instead
# (the Docker image and cluster nodes, where rlsys is installed).
#
# The job trains with GRPO (rlsys train): event files, checkpoints and validation results go to
# the config's runner.output_dir (outputs/<experiment>/ by default); a rerun resumes from the
# newest complete checkpoint there (runner.resume=false starts over).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
config="${1:-smollm2-135m-grpo-cpu}"
[[ $# -gt 0 ]] && shift

if [[ "${RLSYS_USE_CURRENT_PYTHON:-0}" == "1" ]]; then
  python_bin="$(command -v python3)"
else
  bash "$root/scripts/ensure_venv.sh"
  python_bin="$root/.venv/bin/python"
fi

cd "$root"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python_bin" -m rlsys train "$config" "$@"
