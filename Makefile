# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./fleetward-data
DEB_PACKAGES := openssl curl softhsm2 libengine-pkcs11-openssl opensc mosquitto-clients mosquitto
# Azure's device SDK pins paho-mqtt < 2 (Fleetward needs 2): the SAS interop test runs its
# token generator from a virtual environment of its own.
AZURE_VENV := .venv-azure
AZURE_PACKAGES := azure-iot-device>=2.14
# Both cores: the suite is mostly waiting on servers and sockets.
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?=

.PHONY: run test lint typecheck bench clean deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when pyproject.toml changes.
$(VENV)/.stamp-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.stamp-run

run: $(VENV)/.stamp-run
	@test -f $(DATA_DIR)/fleetward.toml || $(BIN)/fleetward init --data-dir $(DATA_DIR)
	@echo "in another shell, here: . $(VENV)/bin/activate && export FLEETWARD_DATA_DIR=$(DATA_DIR)"
	$(BIN)/fleetward serve --data-dir $(DATA_DIR)

# Debian packages the tests drive (openssl, curl, SoftHSM2, the PKCS#11 engine the agent
# uses for mTLS with a token key, OpenSC's pkcs11-tool to read key attributes back,
# Mosquitto's clients and broker); installed only when missing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(AZURE_VENV)/.stamp:
	$(PYTHON) -m venv $(AZURE_VENV)
	$(AZURE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AZURE_VENV)/bin/pip install --quiet '$(AZURE_PACKAGES)'
	touch $@

test: deps $(VENV)/.stamp-test $(AZURE_VENV)/.stamp
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(VENV)/.stamp-run
	$(BIN)/python bench/issue.py
	$(BIN)/python bench/enroll.py
	$(BIN)/python bench/handshake.py
	$(BIN)/python bench/mqtt.py
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/tokens.py

clean:
	rm -rf $(VENV) $(AZURE_VENV) .pytest_cache .mypy_cache .ruff_cache
