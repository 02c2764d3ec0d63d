# One place for the project's commands; the README and .ci/run call these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600
# Packages that building libvirt-python and systemd-python need (they compile against the
# host's libvirt and libsystemd).
AGENT_DEBS := libvirt-dev libsystemd-dev libvirt-clients pkg-config gcc python3-dev python3-venv

.PHONY: help deps venv lint unit lab-setup role-setup test demo bench bench-topology clean

help:
	@echo "make demo    set up the local libvirt lab and watch the agent balance real guests"
	@echo "make test    set everything up, then lint, type-check and run every test"
	@echo "make bench   run the simulator benchmark and rewrite docs/benchmark.md"
	@echo "make bench-topology  the same on hosts with NUMA nodes and SMT threads"

deps:
	@missing=$$(for p in $(AGENT_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then $(APT) update -qq && $(APT) install -y -qq \
	  --no-install-recommends $$missing; fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,role,bench,journal]'
	touch $@

lint: venv
	$(BIN)/ruff check agent tests
	$(BIN)/ruff format --check agent tests
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q -m "not lab and not role"

lab-setup: venv
	bash tests/lab/setup.sh

role-setup: venv
	bash tests/role/setup.sh

test: lint lab-setup role-setup
	$(BIN)/pytest -ra --durations=20

demo: venv lab-setup
	bash tests/lab/demo.sh

bench: venv
	$(BIN)/vcpusched bench

# Hosts with NUMA nodes and sibling threads; rewrites docs/benchmark-topology.md (about 10 s).
bench-topology: venv
	$(BIN)/python -m vcpusched_sim.topo_bench --docs docs

clean:
	rm -rf $(VENV) .lab .pytest_cache .mypy_cache .ruff_cache
