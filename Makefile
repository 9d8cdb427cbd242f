# Two commands on a fresh machine (Python >= 3.10 with venv):
#   make demo   set up .venv and run the main job on embedded defaults (synthetic data)
#   make test   set up .venv and run the test suite
# (make lint: ruff + mypy, run by CI before the tests)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch on this project's machines; set TORCH_SPEC="torch" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-all lint bench-io clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/lung-effnet demo --out demo_output

test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(VENV)/.installed
	$(BIN)/ruff check lung_effnet pipelines tests benchmarks configs
	$(BIN)/mypy

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench-io: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_io.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
