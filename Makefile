# make setup  - create (or reuse) .venv: torch first (never upgraded afterwards), then omniq-lightning[dev]
# make demo   - set up and run the main job on the embedded default (stories260K)
# make test   - set up and run the test suite
# make lint   - ruff
# make llama-cpp - build llama.cpp (llama-cpp-python, from source: about 10 minutes on 2 cores) into .venv, so
#                  that the tests also run our GGUF files in llama.cpp itself (they are skipped without it)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
LLAMA_CPP_VERSION ?= 0.3.36
# portable x86 flags (a native build may use instructions a virtual machine refuses, e.g. AMX), no multimodal
# library; --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so a wheel built otherwise is never reused
LLAMA_CPP_CMAKE ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup demo test lint llama-cpp
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

llama-cpp: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --no-cache-dir \
		-c $(VENV)/torch-constraint.txt llama-cpp-python==$(LLAMA_CPP_VERSION)
