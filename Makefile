# The two commands: `make demo` and `make test`. Both set the machine up first
# (scripts/setup is idempotent and fast when nothing changed).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup:
	@scripts/setup

demo: setup
	@$(PY) scripts/demo.py $(if $(KEEP),--keep) $(DEMO_ARGS)

test: setup
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy agent server common

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
