# Two entry points for a fresh machine:
#   make demo   creates .venv, installs jresid, and analyses a prompt with the shipped model
#   make test   creates .venv with the test extras and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
PROMPT ?= Alice has 3 apples. Bob gives her 4 more. Now Alice has 7 apples.

.PHONY: venv venv-dev demo test test-fast lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e .

venv-dev: $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[reference,dev]'

demo: venv
	$(BIN)/jresid analyze --prompt "$(PROMPT)" --out runs/demo

test: venv-dev
	$(BIN)/python -m pytest -q

test-fast: venv-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Regenerate the constraints file from the current environment.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
