# The two set-up commands of the README: `make train` (the main job) and `make test` (the suite).
# Both create ./.venv on first use and reinstall only when pyproject.toml or the lock changes.
# pyproject.toml states compatible ranges; `-c requirements.lock` installs the exact tested tree.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxnv-installed
BENCH_STAMP := $(VENV)/.jaxnv-bench-installed
PYTEST_ARGS ?=

.PHONY: install train test lint format lock bench

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	touch $(STAMP)

# The benchmarks' PyTorch reference (CPU build, from the wheel on disk); `make test` smoke-runs it.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## run one benchmark: make bench NAME=overhead [ARGS=--quick]
	$(BIN)/jaxnv bench $(NAME) $(ARGS)

train: $(STAMP)  ## a real training run: house_prices on the CPU
	$(BIN)/jaxnv train house_prices $(ARGS)

test: $(STAMP) $(BENCH_STAMP)  ## lint + the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lock: $(STAMP)  ## refresh requirements.lock from the venv
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^jaxnv' > requirements.lock
