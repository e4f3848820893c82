# Two commands do all the set-up:  `make llm` (train and sample the LLM chapter)  and  `make test`.
# Both create or update a virtual environment in .venv and install the project into it first.
PYTHON ?= python3
VENV   ?= .venv
# A pinned torch is installed before the project, so that `pip install -e .` finds torch already
# satisfied and pip never picks a torch of its own. TORCH picks the release, TORCH_INDEX the wheel index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu llm     # PyTorch's CPU-only wheels: no CUDA libraries
#   make TORCH=torch llm                                           # newest release from PyPI; on Linux it bundles CUDA (GBs)
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
BIN     = $(VENV)/bin

# `make llm ARGS="--resume"` continues an interrupted run in runs/llm (ARGS go to llm/train.py).
ARGS   ?=

.PHONY: install llm test lint clean clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
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
