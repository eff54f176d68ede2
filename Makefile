# `make test` is the test command of the README and of .ci/run.
.PHONY: test venv
venv:
	@bash scripts/ensure_venv.sh

test: venv
	@bash scripts/run_tests.sh
