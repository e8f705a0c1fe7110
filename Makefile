# make setup  - create (or reuse) .venv: torch first (never upgraded afterwards), then omniq-lightning[dev]
# make demo   - set up and run the main job on the embedded default (stories260K)
# make test   - set up and run the test suite
# make lint   - ruff
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $@

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
