# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint install clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The tests' identity provider (tests/oidc: oidc-provider from npm, run by Node.js).
OIDC_TESTS := tests/oidc/node_modules/.installed
$(OIDC_TESTS): tests/oidc/package-lock.json
	npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
	touch $@

# The tests' MCP server over streamable HTTP (tests/mcp: the reference "everything" server).
MCP_TESTS := tests/mcp/node_modules/.installed
$(MCP_TESTS): tests/mcp/package-lock.json
	npm ci --prefix tests/mcp --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed

run: install
	@$(PY) scripts/port_free.py $(HOST) $(PORT)
	$(PY) manage.py migrate --no-input
	$(PY) manage.py runserver $(HOST):$(PORT)

test: install $(OIDC_TESTS) $(MCP_TESTS)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) db.sqlite3 .pytest_cache artifacts tests/oidc/node_modules tests/mcp/node_modules
