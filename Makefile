# The README's three commands: `make run` (main job), `make test` (test suite) and `make lab` (JupyterLab).
# All create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build these machines carry; override on others, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.labkit-installed
RUN_ARGS ?=
# `make lab` opens working copies of the notebooks in runs/lab/ (outside git); LAB_DIR=notebooks opens the originals.
LAB_DIR ?= runs/lab
LAB_STAMP := $(VENV)/.labkit-lab
# JupyterLab refuses to run as root (containers, these machines) without --allow-root; add more with LAB_ARGS=...
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: env run test lint lab clean-venv

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,faiss,browser]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: env
	$(PY) -m labkit run $(RUN_ARGS)

test: env
	$(PY) -m ruff check labkit tests benchmarks notebooks
	$(PY) -m pytest -q

# JupyterLab with live widgets; widget state is saved with a notebook, so a reopened one still shows its views.
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,faiss,browser,lab]"
	$(PY) -c 'import json, pathlib, sys; \
	p = pathlib.Path(sys.prefix, "share", "jupyter", "lab", "settings", "overrides.json"); \
	d = json.loads(p.read_text()) if p.exists() else {}; \
	d.setdefault("@jupyter-widgets/jupyterlab-manager:plugin", {})["saveState"] = True; \
	p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(d, indent=2))'
	touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	@if [ "$(LAB_DIR)" = runs/lab ]; then \
		mkdir -p runs/lab; \
		for nb in notebooks/*.ipynb; do \
			copy=runs/lab/$$(basename $$nb); \
			if [ ! -e $$copy ]; then cp $$nb $$copy; \
			elif [ $$nb -nt $$copy ]; then echo "$$copy is older than $$nb: delete it to get the new version"; fi; \
		done; \
		echo "working copies in runs/lab/ (your edits and outputs stay there, notebooks/ stays clean)"; \
	fi
	$(PY) -m jupyterlab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url="/lab/tree/$(LAB_DIR)" $(LAB_ARGS)

lint: env
	$(PY) -m ruff check labkit tests benchmarks notebooks
	$(PY) -m ruff format --check labkit tests benchmarks

clean-venv:
	rm -rf $(VENV)
