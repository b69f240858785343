# AION-Train set-up on a fresh machine (README "Set-up"):
#   make demo    install everything, then the main job (aion-train pretrain on the embedded default)
#   make test    install everything, lint (ruff check, ruff format --check), then the whole test suite (what .ci/run does)
#   make install only the install; quick when nothing changed (a stamp under .make/)
#
# The install: Debian packages of the optional features (scripts/install_system_deps.sh: installed
# as root or with passwordless sudo, otherwise listed with what needs them), torch 2.13.0 first
# (the local CPU wheel; a GPU node installs its CUDA build of torch 2.13.0 beforehand and pip keeps
# it), then this package with its extras under .ci/constraints.txt (so nothing replaces that torch).
#
# Python: $(PYTHON) itself when it is a venv or an interpreter pip may install into (pyenv, conda,
# python.org builds); otherwise (Debian's "externally managed" python3, PEP 668, or site-packages
# not writable) a venv in $(VENV), which demo and test then use. USE_VENV=yes|no overrides.

PYTHON ?= python3
VENV ?= .venv
USE_VENV ?= auto
TORCH ?= torch==2.13.0
EXTRAS ?= test,retrieval,ray,serve
PYTEST_ARGS ?= -q
DEMO_ARGS ?=
STAMP_DIR := .make

SHELL := /bin/bash
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# one look at $(PYTHON): does it need a venv, its executable, its scripts folder
PYINFO := $(shell $(PYTHON) -c 'import os, sys, sysconfig; \
in_venv = sys.prefix != sys.base_prefix; \
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")); \
writable = os.access(sysconfig.get_path("purelib"), os.W_OK); \
print("no" if in_venv or (not managed and writable) else "yes", sys.executable, sysconfig.get_path("scripts"))' 2>/dev/null)
ifeq ($(USE_VENV),auto)
  override USE_VENV := $(or $(word 1,$(PYINFO)),no)
endif
ifeq ($(USE_VENV),yes)
  PY := $(VENV)/bin/python
  BIN := $(abspath $(VENV)/bin)
else
  PY := $(or $(word 2,$(PYINFO)),$(PYTHON))
  BIN := $(word 3,$(PYINFO))
endif

# the stamp names the interpreter and everything the install depends on
PY_KEY := $(shell echo '$(PY) $(CURDIR)' | sha256sum | cut -c1-8)
INSTALL_KEY := $(shell { cat setup.py .ci/constraints.txt scripts/install_system_deps.sh; \
                         echo '$(TORCH) $(EXTRAS)'; } | sha256sum | cut -c1-16)
STAMP := $(STAMP_DIR)/install-$(PY_KEY)-$(INSTALL_KEY)

# what demo and test run under: the install's scripts first on PATH (aion-train, torchrun, ray, ...)
RUN_ENV := PATH="$(BIN):$$PATH" $(if $(filter yes,$(USE_VENV)),VIRTUAL_ENV="$(abspath $(VENV))")
TEST_ENV := MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.DEFAULT_GOAL := help
.PHONY: help install install-now demo lint test

help:
	@echo "make demo     install everything, then run the main job (aion-train pretrain)"
	@echo "make test     install everything, lint, then run the test suite (PYTEST_ARGS='$(PYTEST_ARGS)')"
	@echo "make lint     ruff check and ruff format --check (ruff.toml)"
	@echo "make install  only the install (skipped while $(STAMP) is current)"
	@echo "Python: $(PY) (USE_VENV=$(USE_VENV))"

install:
	@if [ -f "$(STAMP)" ] && "$(PY)" -c "import importlib.metadata as m; \
	    [m.version(d) for d in ('aion-train', 'torch', 'deepspeed', 'pytest', 'ruff')]" >/dev/null 2>&1; then \
	    echo "make install: up to date ($(PY); 'make install-now' redoes it)"; \
	    scripts/install_system_deps.sh --check; \
	else \
	    $(MAKE) --no-print-directory install-now; \
	fi

install-now:
	@command -v "$(PYTHON)" >/dev/null || { echo "make install: $(PYTHON) not found; AION-Train needs" \
	    "Python 3.10+ (Debian: apt-get install python3 python3-venv), or pass PYTHON=..." >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else \
	    "make install: AION-Train needs Python 3.10+; $(PYTHON) is " + sys.version.split()[0])'
	$(if $(filter yes,$(USE_VENV)),VENV_PYTHON="$(PYTHON)" )scripts/install_system_deps.sh
ifeq ($(USE_VENV),yes)
	@[ -x "$(VENV)/bin/python" ] || { echo "$(PYTHON) -m venv $(VENV)"; "$(PYTHON)" -m venv "$(VENV)"; }
	"$(PY)" -m pip install -q --upgrade pip
endif
	"$(PY)" -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 "$(PY)" -m pip install -q -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	@mkdir -p $(STAMP_DIR) && rm -f $(STAMP_DIR)/install-$(PY_KEY)-* && touch "$(STAMP)" \
	    && echo "make install: done ($(PY))"

demo: install
	$(RUN_ENV) "$(BIN)/aion-train" pretrain $(DEMO_ARGS)

lint: install
	"$(PY)" -m ruff check .
	"$(PY)" -m ruff format --check .

test: lint
	$(RUN_ENV) $(TEST_ENV) "$(PY)" -m pytest $(PYTEST_ARGS)
