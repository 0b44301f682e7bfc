# The two commands of the README: `make demo` and `make test`. Both start from a machine with nothing
# installed: they create .venv, install the project into it, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow bench install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/viewssl demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

bench: $(STAMP)
	$(PY) -m experiments.bench_render
	$(PY) -m experiments.bench_knn
	$(PY) -m experiments.bench_encoder
	$(PY) -m experiments.bench_ssv --preset paper --batch-size 2

clean:
	rm -rf $(VENV) .pytest_cache  # not runs/: training runs are kept (remove them by hand)
