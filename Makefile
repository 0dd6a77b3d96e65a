# Set-up and the two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo install clean

install: $(STAMP)

# torch first, from the CPU wheel on disk, so nothing below pulls another build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	bash scripts/remove_broken_torchaudio.sh $(PY)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Skips the end-to-end tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Everything under demo_out/; e.g. `make demo DEMO_ARGS=--quick` for a smoke test.
demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
