# tasklocks: `make demo` runs the main job on SQLite, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mysql,postgres,web,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tasklocks.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict

# Two runs: the tests that may share the machine, three at a time (pytest-xdist: they mostly
# wait on processes and servers), then the stress tests alone (many processes each; outages
# restart the servers and stop PostgreSQL's WAL writer). `pytest` alone runs everything in turn.
unit: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -n 3 -m "not stress"
	$(BIN)/pytest -p no:cacheprovider -m stress

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build dist src/*.egg-info
