# The two commands the README gives: `make demo` and `make test`.
# Both create .venv when it is missing (PyTorch first, from the pinned wheel, so pip never
# pulls a CUDA build) and are quick when it exists.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the slowest tests in every log (CI included): where the suite's time goes
PYTEST_ARGS ?= --durations=20

.PHONY: demo test venv bundle clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@# CPU torch wheels ship no Triton: the decode kernels' tests then run in Triton's interpreter
	$(PY) -c 'import triton' 2>/dev/null || $(PY) -m pip install -q triton==3.9.0
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/speedrun.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache
