# The two set-up commands of the README: `make train` (the main job) and `make test` (the suite).
# Both create ./.venv on first use and reinstall only when pyproject.toml or the lock changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxnv-installed
PYTEST_ARGS ?=

.PHONY: install train test lint format lock

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	touch $(STAMP)

train: $(STAMP)  ## a real training run: house_prices on the CPU
	$(BIN)/jaxnv train house_prices $(ARGS)

test: $(STAMP)  ## lint + the whole test suite
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
