# The README's two commands: `make run` (main job) and `make test` (test suite).
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build these machines carry; override on others, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.labkit-installed
RUN_ARGS ?=

.PHONY: env run test lint clean-venv

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,faiss]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: env
	$(PY) -m labkit run $(RUN_ARGS)

test: env
	$(PY) -m ruff check labkit tests benchmarks notebooks
	$(PY) -m pytest -q

lint: env
	$(PY) -m ruff check labkit tests benchmarks notebooks
	$(PY) -m ruff format --check labkit tests benchmarks

clean-venv:
	rm -rf $(VENV)
