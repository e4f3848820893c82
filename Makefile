# Two commands do all the set-up:  `make llm` (train and sample the LLM chapter)  and  `make test`.
# Both create or update a virtual environment in .venv and install the project into it first.
PYTHON ?= python3
VENV   ?= .venv
# A pinned torch is installed before the project, so that `pip install -e .` finds torch already
# satisfied and never pulls a multi-GB CUDA build. On a GPU machine: make TORCH=torch llm
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

# `make llm ARGS="--resume"` continues an interrupted run in runs/llm (ARGS go to llm/train.py).
ARGS   ?=

.PHONY: install llm test lint clean clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

llm: install
	$(BIN)/python llm/train.py $(ARGS)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# `clean` removes the virtual environment only; trained models and tokenizers in runs/ stay.
clean:
	rm -rf $(VENV)

# `clean-runs` deletes runs/: every checkpoint, tokenizer, metrics file and plot that training wrote.
clean-runs:
	rm -rf runs
