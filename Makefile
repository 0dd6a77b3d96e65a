# Set-up and the two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-cluster lint demo install clean

install: $(STAMP)

# torch first, from the CPU wheel on disk, so nothing below pulls another build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	bash scripts/remove_broken_torchaudio.sh $(PY)
	touch $(STAMP)

# ruff (settings in ruff.toml): the linter and the formatter's check, before the tests.
# `$(VENV)/bin/ruff format .` formats the tree.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# Skips the end-to-end tests marked slow.
test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

# The SLURM and multi-node tests against a throwaway one-node SLURM on this host
# (scripts/local_slurm.sh; needs root, apt-get installs slurm-wlm, munge, mariadb).
test-cluster: $(STAMP)
	set -e; trap 'scripts/local_slurm.sh stop' EXIT; eval "$$(scripts/local_slurm.sh start)"; \
	KNNVQ_REQUIRE_SLURM=1 $(PY) -m pytest -q tests/e2e/test_slurm_e2e.py tests/e2e/test_slurm_study_e2e.py \
	  tests/e2e/test_multinode_e2e.py

# Everything under demo_out/; e.g. `make demo DEMO_ARGS=--quick` for a smoke test.
demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
