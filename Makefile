# `make test` is the test command of the README and of .ci/run.
.PHONY: test venv test-slurm test-long
venv:
	@bash scripts/ensure_venv.sh

test: venv
	@bash scripts/run_tests.sh -m "not long"

# The soaks (tests marked long): a long training run and back-to-back weight syncs, each process's
# memory and open files sampled. Not part of `make test`.
test-long: venv
	@bash scripts/run_tests.sh -m long -s

# ray_utils/slurm_grpo.sbatch under a real one-node SLURM (root; installs SLURM when missing):
# scripts/test_slurm.sh. Not part of `make test`.
test-slurm: venv
	@bash scripts/test_slurm.sh
