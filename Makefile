# Two entry points, each sets itself up on a fresh machine:
#   make train   trains configs/digits.py on the offline digits dataset and prints the test accuracy
#   make test    lint + format check + the whole test suite
# The package is not pip-installed into .venv: every command runs from the checkout (its root is on
# sys.path), so .venv stays exactly requirements.txt. `pip install -e .` is for other environments.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits

$(VENV)/.installed: requirements.txt requirements-deploy.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-deploy.txt
	touch $@

.PHONY: setup train test lint format
setup: $(VENV)/.installed

train: setup
	$(PY) train.py --config configs/digits.py --workdir $(WORKDIR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n 2 --dist loadfile --durations=30 tests
