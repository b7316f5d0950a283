# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATABASE ?= sqlite:///./taskorch.db
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install run test lint clean bench

$(BIN)/taskorch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/taskorch
	@echo "installed $(BIN)/taskorch: run it by that path, or '. $(BIN)/activate' for a bare taskorch"

install: $(BIN)/taskorch

run: install
	$(BIN)/taskorch serve --host $(HOST) --port $(PORT) --database $(DATABASE)

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check api analytics bench tests
	$(BIN)/ruff format --check api analytics bench tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
