# Corral — the two commands: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# uv from PATH, else the copy pip installs as a module (`python3 -m uv`).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
DEBIAN_PACKAGES := bubblewrap python3 iproute2
PYTEST_ARGS ?=

.PHONY: help setup system-packages python-env test lint bench run doctor clean

help:
	@echo "make run    - set up, then run a first command in a sandbox"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make lint   - ruff and mypy (strict)"
	@echo "make bench  - the engine benchmark (prints JSON)"

setup: system-packages python-env

# Debian packages the engine needs; installed when missing (as root), else explained.
system-packages:
	@missing=(); for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing+=($$p); \
	done; \
	if [ $${#missing[@]} -gt 0 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $${missing[*]}"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$${missing[@]}" >/dev/null; \
	  else \
	    echo "missing Debian packages: $${missing[*]}"; \
	    echo "run: sudo apt-get install -y $${missing[*]}   (or run make as root)"; exit 1; \
	  fi; \
	fi

python-env:
	@$(UV) --version >/dev/null 2>&1 || { echo "installing uv from PyPI"; \
	  python3 -m pip install --quiet uv 2>/dev/null || \
	  python3 -m pip install --quiet --user --break-system-packages uv; }
	@$(UV) sync --quiet --frozen

test: setup
	@$(UV) run --frozen pytest $(PYTEST_ARGS)

lint: python-env
	@$(UV) run --frozen ruff check src tests benchmarks && \
	$(UV) run --frozen ruff format --check src tests benchmarks && \
	$(UV) run --frozen mypy

bench: setup
	@$(UV) run --frozen python benchmarks/engine.py --json

doctor: setup
	@$(UV) run --frozen corral doctor

run: setup
	@echo "running a first command in a fresh namespace sandbox:"
	@$(UV) run --frozen corral run -- sh -c 'echo "hello from $$(hostname) as $$(id -un), pid $$$$"; uname -sr'
	@echo
	@echo "next: uv run corral run -- python3 -c 'print(6 * 7)'   |   uv run corral doctor   |   make test"

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
