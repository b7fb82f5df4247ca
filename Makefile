# Two commands for a new user: `make demo` and `make test` (README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: any other spec pulls a multi-GB CUDA build on a CPU box.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,ndi,onnx,openvino,vcam,obs,oscquery,tempo]"
	touch $@

demo: $(STAMP)
	$(BIN)/streamnode demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(TEST_STAMP)
	$(BIN)/ruff check streamnode tests benchmarks obs touchdesigner

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py

clean:
	rm -rf $(VENV) build *.egg-info
