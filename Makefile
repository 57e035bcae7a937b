# flipguard — two commands do all the set-up: `make demo` and `make test`.
# Installs come from pylock.toml (the PEP 751 lock file: exact versions and hashes, resolved
# with uv for CPython 3.11 on x86-64 Linux) and constraints.txt (the same pins as name==version,
# for pip); `make lock` refreshes both deliberately. torch is installed first from $(TORCH)
# (the CPU build), so no CUDA packages are pulled in.
PYTHON ?= python3
TORCH ?= torch==2.13.0
UV_VERSION ?= 0.13.9
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := UV_NATIVE_TLS=1 $(BIN)/uv
UVPIP := $(UV) pip install --quiet --python $(BIN)/python

.PHONY: demo test install lint lock browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml pylock.toml constraints.txt
	$(BIN)/python -m pip install --quiet "$(TORCH)" "uv==$(UV_VERSION)" -c constraints.txt
	$(UVPIP) -r pylock.toml
	$(UVPIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flipguard demo

# The report's headless-browser test needs Debian's chromium; install it where we may (root
# with apt-get), otherwise that one test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test of the report will skip"; }

# Unit and integration tests plus every docstring example (--doctest-modules, see pyproject).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools

# Refresh the lock on purpose (never done by demo/test): newest versions that satisfy
# pyproject.toml, torch itself excluded (it comes from $(TORCH)).
lock: $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	echo "$(TORCH)+cpu" > $(VENV)/torch-override.txt
	$(UV) pip compile pyproject.toml --extra dev --extra ray --extra nas --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 $(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
	  --override $(VENV)/torch-override.txt --no-emit-package torch \
	  --custom-compile-command "make lock" -o pylock.toml
	$(BIN)/python tools/constraints_from_lock.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
