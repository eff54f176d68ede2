# `make test` is the test command of the README and of .ci/run.
.PHONY: test venv test-slurm
venv:
	@bash scripts/ensure_venv.sh

test: venv
	@bash scripts/run_tests.sh

# ray_utils/slurm_grpo.sbatch under a real one-node SLURM (root; installs SLURM when missing):
# scripts/test_slurm.sh. Not part of `make test`.
test-slurm: venv
	@bash scripts/test_slurm.sh
