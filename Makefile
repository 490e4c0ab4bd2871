# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# Both create or reuse .venv, install torch==2.13.0 first (exact pin: a range would pull a
# multi-GB CUDA build), then the project with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[serve,events,train,operator,test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install torch + the project with all extras

demo: $(STAMP) ## Run the end-to-end demo on the embedded profile (no servers needed)
	$(BIN)/recsys demo

test: $(STAMP) lint ## Lint, then run the test suite (needs PostgreSQL, Redis and NATS on 127.0.0.1)
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check and ruff format --check over the whole tree (the pinned ruff of the test extra)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## Run the benchmarks (needs PostgreSQL, Redis, NATS and ../shared/data), writing bench/results/*.json
	$(BIN)/python bench/features.py
	$(BIN)/python bench/materialize.py
	$(BIN)/python bench/events.py
	$(BIN)/python bench/event_path.py
	$(BIN)/python bench/quality.py --dataset ml-100k
	$(BIN)/python bench/quality.py --dataset ml-latest-small
	$(BIN)/python bench/levels.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/model_sizes.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/frontier.py
	$(BIN)/python bench/autoscale.py

clean: ## Remove local state (embedded stores, caches), keep .venv
	rm -rf .recsys .recsys-bench .pytest_cache

.PHONY: help install demo test lint format bench clean
