# Corral — the two commands: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Python writes its bytecode caches (some machines' environments say not to): without them
# every process, each server and CLI call the tests start, compiles its imports from source
# again, about 2.4 s of CPU per server start on 2 cores.
unexport PYTHONDONTWRITEBYTECODE
# uv from PATH, else the copy pip installs as a module (`python3 -m uv`).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
# nftables, passt (pasta) and slirp4netns: the sandboxes' network (issue 12) and its tests.
DEBIAN_PACKAGES := bubblewrap python3 iproute2 util-linux nftables passt slirp4netns
# mmdebstrap, dpkg-dev (dpkg-scanpackages) and apt-utils (apt-ftparchive): templates' Debian
# bases and the local archive tests bootstrap them from (issue 13).
DEBIAN_PACKAGES += mmdebstrap dpkg-dev apt-utils
# skopeo fetches OCI images (zstd for zstd layers); docker-registry and apache2-utils
# (htpasswd) give the OCI tests a registry on loopback (issue 13).
DEBIAN_PACKAGES += skopeo zstd docker-registry apache2-utils
# runsc: gVisor, the `gvisor` isolation tier's kernel in user space (issue 15). On Debian 12
# it comes from bookworm-backports (`gvisor-runsc` below): bookworm's own is from 2022.
DEBIAN_PACKAGES += runsc
# PostgreSQL (issue 16): the tests start a throwaway cluster of it (tests/kit/postgres.py) and
# run the store, queue and API tests on it as on SQLite; the driver is psycopg's wheel.
DEBIAN_PACKAGES += postgresql
# The microvm tier (issue 15): QEMU, qemu-img, and busybox for the guest's initramfs.
# (virtiofsd, which serves volumes and the host's /usr to its guests, comes with
# qemu-system-x86: /usr/lib/qemu/virtiofsd, in qemu-system-common.)
DEBIAN_PACKAGES += qemu-system-x86 qemu-utils busybox-static
# Its guest kernel: Debian's cloud kernel .deb, fetched by `corral.isolation.guest_kernel`.
GUEST_KERNEL_DIR := .cache/guest-kernel
# The .debs of a minimal Debian base, as a file:// repository: tests bootstrap from it offline.
DEBIAN_ARCHIVE := .cache/debian
# `make test` leaves out the slow tests (`make test-slow` runs them); PYTEST_ARGS= runs all.
# It runs them on two pytest-xdist workers, a test file each at a time (XDIST): 15-16 min
# instead of 32 in one process here. XDIST= runs them in one process.
PYTEST_ARGS ?= -m "not slow"
XDIST ?= -n 2 --dist loadfile

.PHONY: help install uninstall setup system-packages gvisor-runsc python-env debian-archive guest-kernel test-caches test test-e2b test-unit test-integration test-acceptance test-slow test-tiers lint bench run doctor proto clean

help:
	@echo "make run    - set up, start the API server, run a first command through it"
	@echo "make test   - set up, then run the whole test suite (all three tiers) but the slow tests,"
	@echo "              then the official e2b SDK's tests (tests/e2b_sdk)"
	@echo "make test-e2b - only the official e2b SDK against a Corral server (tests/e2b_sdk)"
	@echo "make test-slow - only the slow tests (pytest -m slow: the vm languages other than"
	@echo "              python, whose first template builds take minutes each)"
	@echo "make test-tiers - only the tests that run once per isolation tier (namespace, gvisor,"
	@echo "              microvm), all of them on microvm too (make test runs a subset there: TCG)"
	@echo "make test-unit / test-integration / test-acceptance - one tier (pytest -m <tier>)"
	@echo "make lint   - ruff, mypy (strict), the layers (import-linter), and a fresh generated API"
	@echo "make bench  - the engine, API and isolation tiers benchmarks (one JSON object each)"
	@echo "make install - systemd units for the server and workers (corral install; INSTALL_ARGS=...)"
	@echo "make proto  - regenerate src/corral/v1/ and src/corral/envd/ from proto/corral/*/*.proto"

setup: system-packages gvisor-runsc python-env debian-archive guest-kernel

# Debian packages the engine needs; installed when missing (as root), else explained.
system-packages:
	@missing=(); for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing+=($$p); \
	done; \
	if [ $${#missing[@]} -gt 0 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $${missing[*]}"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$${missing[@]}" >/dev/null; \
	    if [[ " $${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then \
	      systemctl disable --now docker-registry >/dev/null 2>&1 || true; \
	      echo "docker-registry is installed for the tests only: its service is disabled"; \
	    fi; \
	    if [[ " $${missing[*]} " == *" postgresql "* ]] && command -v systemctl >/dev/null; then \
	      systemctl disable --now postgresql >/dev/null 2>&1 || pg_ctlcluster --mode fast $$(ls /usr/lib/postgresql | sort -V | tail -1) main stop >/dev/null 2>&1 || true; \
	      echo "postgresql is installed for the tests' throwaway clusters: its own service is disabled (systemctl enable --now postgresql to run one)"; \
	    fi; \
	  else \
	    echo "missing Debian packages: $${missing[*]}"; \
	    echo "run: sudo apt-get install -y $${missing[*]}   (or run make as root)"; exit 1; \
	  fi; \
	fi

# Debian 12's runsc (0.0~20221219) has no systrap platform (ptrace only where KVM cannot
# run guests: slow) and fails coreutils' statx (`ls -l`: EINVAL). bookworm-backports, an
# official Debian suite, has runsc 0.0~20240729 with both fixed: as root, its source is
# added (when no backports source is) and runsc is taken from there. Other releases keep
# their own runsc.
BACKPORTS_LIST := /etc/apt/sources.list.d/corral-bookworm-backports.list
gvisor-runsc: system-packages
	@. /etc/os-release; [ "$${VERSION_CODENAME:-}" = bookworm ] || exit 0; \
	version=$$(dpkg-query -W -f='$${Version}' runsc 2>/dev/null); \
	case "$$version" in 0.0~2022*) ;; *) exit 0;; esac; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "runsc $$version is Debian 12's (ptrace only, no statx): as root, install runsc from bookworm-backports"; exit 0; \
	fi; \
	if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then \
	  echo "deb http://deb.debian.org/debian bookworm-backports main" > $(BACKPORTS_LIST); \
	  echo "added the bookworm-backports source ($(BACKPORTS_LIST))"; \
	fi; \
	echo "installing runsc from bookworm-backports (Debian 12's is from 2022)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports runsc >/dev/null

# The microvm tier's guest kernel (apt-get download from the host's apt sources), once;
# the tests use this copy (tests/test_microvm.py). Delete the dir to refresh.
guest-kernel: system-packages python-env
	@$(UV) run --frozen python -m corral.isolation.guest_kernel $(GUEST_KERNEL_DIR) >/dev/null
	@# ...and where a server started with no CORRAL_* variables looks (its data dir).
	@$(UV) run --frozen python -m corral.isolation.guest_kernel >/dev/null

# Downloaded once (as root: mmdebstrap resolves the package set in a throw-away chroot),
# again when the script's package list changes; without root the template tests that need
# it skip and say so. Delete the dir to refresh.
debian-archive: system-packages
	@if [ "$$(id -u)" = 0 ]; then scripts/debian_archive.sh $(DEBIAN_ARCHIVE); \
	elif [ -f $(DEBIAN_ARCHIVE)/Release ]; then :; \
	else echo "no local Debian archive in $(DEBIAN_ARCHIVE): run make setup as root once (template tests skip until then)"; fi

python-env:
	@$(UV) --version >/dev/null 2>&1 || { echo "installing uv from PyPI"; \
	  python3 -m pip install --quiet uv 2>/dev/null || \
	  python3 -m pip install --quiet --user --break-system-packages uv; }
	@$(UV) sync --quiet --frozen
	@$(UV) sync --quiet --frozen --project tests/e2b_sdk

# The Debian bases the tests share (tests/kit/caches.py), built before pytest: a first
# bootstrap inside a test would run under its 120 s timeout (minutes on a loaded machine).
test-caches: setup
	@$(UV) run --frozen python -m tests.kit.caches

# The 30 slowest tests are listed at the end: what to look at when the suite grows slow.
test: test-caches
	@$(UV) run --frozen pytest --durations=30 $(XDIST) $(PYTEST_ARGS)
	@$(UV) run --project tests/e2b_sdk --frozen pytest tests/e2b_sdk

# The official e2b SDK (its own uv project: it cannot share Corral's venv) against a real
# Corral server, with the `base` template made from the local Debian archive.
test-e2b: setup
	@$(UV) run --project tests/e2b_sdk --frozen pytest tests/e2b_sdk

# The tiers (assigned in tests/conftest.py): unit is pure logic and needs no system packages.
test-unit: python-env
	@$(UV) run --frozen pytest $(PYTEST_ARGS) -m "unit and not slow"

test-integration: test-caches
	@$(UV) run --frozen pytest $(PYTEST_ARGS) -m "integration and not slow"

test-acceptance: test-caches
	@$(UV) run --frozen pytest $(PYTEST_ARGS) -m "acceptance and not slow"

test-slow: test-caches
	@$(UV) run --frozen pytest -m slow

# Every test marked to run on each isolation tier, on every tier this host offers (a tier it
# lacks skips with the reason); `make test` leaves most of the microvm runs out (`slow`).
test-tiers: test-caches
	@$(UV) run --frozen pytest -m tiers

lint: python-env
	@$(UV) run --frozen ruff check src tests benchmarks scripts && \
	$(UV) run --frozen ruff format --check src tests benchmarks scripts && \
	$(UV) run --frozen mypy && \
	$(UV) run --frozen lint-imports --no-logo --no-cache && \
	$(UV) run --frozen python scripts/protogen.py --check

# Pinned generators (dev dependencies): protoc from grpcio-tools, protoc-gen-connectrpc.
proto: python-env
	@$(UV) run --frozen python scripts/protogen.py

bench: setup
	@$(UV) run --frozen python benchmarks/engine.py --json
	@$(UV) run --frozen python benchmarks/api.py --json
	@$(UV) run --frozen python benchmarks/jobs.py --json
	@$(UV) run --frozen python benchmarks/cli.py --json
	@$(UV) run --frozen python benchmarks/terminals.py --json
	@$(UV) run --frozen python benchmarks/tiers.py --json

doctor: setup
	@$(UV) run --frozen corral doctor

# The server in the foreground (embedded defaults: SQLite and the default team's key under
# the data dir); once it answers, a first command runs through the API. Ctrl-C stops it.
run: setup
	@$(UV) run --frozen corral server --demo

# systemd units running this checkout's `corral` (README, "Running it as a service"), e.g.
# make install INSTALL_ARGS="--set host=0.0.0.0"; `make uninstall` removes them.
install: system-packages gvisor-runsc python-env guest-kernel
	@$(UV) run --frozen corral install $(INSTALL_ARGS)

uninstall: python-env
	@$(UV) run --frozen corral uninstall $(INSTALL_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
