# edgeos — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
export EDGEOS_TEST_PG_DSN ?= postgresql://edgeos_test:edgeos_test@127.0.0.1:5432/postgres
PY := $(VENV)/bin/python
# Four distributions from one checkout: the gateway (.), the cloud, the simulator/demo and the
# test support (never shipped). The stamp changes when any of their pyproject files does.
PYPROJECTS := pyproject.toml cloud/pyproject.toml sim/pyproject.toml testsupport/pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(PYPROJECTS) | md5sum | cut -c1-12)
LINT_PATHS := $(wildcard edgeos drivers protocol cloud sim testsupport tests bench hil_tests models examples)

.PHONY: help venv services lint format test test-loaded test-slow bench demo models clean

help:
	@echo "make demo       set up and run the whole thing locally (simulated line, runtime, broker, receiver)"
	@echo "make test       set up and run lint + the test suite"
	@echo "make test-loaded  \`make test\` $(LOADED_RUNS) times in a row with both cores kept busy (stress-ng)"
	@echo "make test-slow  also the slow soak/fuzz tests"
	@echo "make bench      run every benchmark (each prints one JSON object)"
	@echo "make lint       ruff + mypy --strict + import-linter (the gateway/cloud/protocol boundaries)"

$(STAMP): $(PYPROJECTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgeos needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,speed]' -e './cloud[postgres,models]' -e ./sim -e ./testsupport
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

# Mosquitto and PostgreSQL for the tests: installed when missing, started when stopped.
services:
	@bash .ci/ensure-services

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

test: venv services lint
	$(PY) -m pytest

# `make test` LOADED_RUNS times in a row while stress-ng keeps every core busy: the suite must not
# depend on an idle machine (issue #20). stress-ng is installed by .ci/ensure-services; the hog
# is stopped when the runs end, also when one fails or is interrupted.
LOADED_RUNS ?= 3
LOADED_HOG ?= stress-ng --cpu $(shell nproc) --quiet
test-loaded: venv services
	@command -v stress-ng >/dev/null || { echo "test-loaded: stress-ng is not installed" >&2; exit 1; }
	@set -u; $(LOADED_HOG) & hog=$$!; \
	trap 'kill $$hog 2>/dev/null; wait $$hog 2>/dev/null' EXIT INT TERM; \
	for i in $$(seq 1 $(LOADED_RUNS)); do \
	  echo "== test-loaded: run $$i of $(LOADED_RUNS) under '$(LOADED_HOG)'" >&2; \
	  $(MAKE) --no-print-directory test || { echo "== test-loaded: run $$i failed" >&2; exit 1; }; \
	done; echo "== test-loaded: $(LOADED_RUNS) runs passed under load" >&2

test-slow: venv services
	$(PY) -m pytest -m slow

bench: venv services
	@for b in bench/*.py; do case $$b in bench/_*|bench/*_bench.py) continue;; esac; \
	  echo "== $$b" >&2; $(PY) $$b $(BENCH_ARGS) || exit 1; done

demo: venv
	$(VENV)/bin/edgeos demo

# TensorFlow lives in its own venv: it would fight ai-edge-litert over protobuf in .venv.
models:
	test -x .venv-train/bin/python || $(PYTHON) -m venv .venv-train
	.venv-train/bin/pip install --quiet tensorflow-cpu pydantic numpy msgpack
	.venv-train/bin/pip install --quiet --no-deps -e . -e ./sim
	.venv-train/bin/python models/train_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# --- arm64 lane (docs/arm64.md): the suite inside an emulated Debian bookworm arm64 root
# (mmdebstrap + qemu-user-static), cached in /var/cache/edgeos. Needs root and binfmt_misc.
.PHONY: arm64-root test-arm64 test-arm64-ci test-arm64-image

arm64-root:
	bash images/arm64/build-root.sh

test-arm64:
	bash images/arm64/run-tests.sh $(PYTEST_ARGS)

# The named subset (images/arm64/ci-tests.txt) that .ci/run runs on every change.
test-arm64-ci:
	bash images/arm64/run-tests.sh --ci $(PYTEST_ARGS)

# images/stage-edgeos.sh as an image builder's chroot step, checked in the arm64 root.
test-arm64-image:
	bash images/arm64/test-stage.sh

# JetPack 6 (docs/arm64.md "Jetson"): the suite in an Ubuntu 22.04 root on Ubuntu's python3.11.
# JAMMY_ARCH=arm64 (the Jetson, needs ports.ubuntu.com) or amd64 (native, archive.ubuntu.com).
JAMMY_ARCH ?= arm64
.PHONY: jammy-root test-jammy test-jammy-ci
jammy-root:
	EDGEOS_JAMMY_ARCH=$(JAMMY_ARCH) bash images/jammy/build-root.sh

test-jammy:
	root=$$(EDGEOS_JAMMY_ARCH=$(JAMMY_ARCH) bash images/jammy/build-root.sh) && \
	  EDGEOS_TEST_ROOT=$$root bash images/arm64/run-tests.sh $(PYTEST_ARGS)

test-jammy-ci:
	root=$$(EDGEOS_JAMMY_ARCH=$(JAMMY_ARCH) bash images/jammy/build-root.sh) && \
	  EDGEOS_TEST_ROOT=$$root bash images/arm64/run-tests.sh --ci $(PYTEST_ARGS)

# --- bootable arm64 A/B image (issue #18; images/README.md, docs/ota.md "Root filesystem A/B"):
# a Debian bookworm disk image (mmdebstrap + genimage; RAUC A/B roots, GRUB-EFI, data partition)
# built in /var/cache/edgeos/image, and its boot test in qemu-system-aarch64 (TCG), which prints
# JSON figures. Need root; host tools are installed by images/ensure-image-tools when missing.
# Neither is part of `make test`.
.PHONY: image test-boot

image:
	bash images/qemu/build-image.sh

test-boot:
	bash images/test-boot.sh $(TEST_BOOT_ARGS)
