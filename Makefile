# kdfast: `make test` and `make bench` do all set-up on a fresh machine (a .venv with torch 2.13.0,
# triton and the build tools, then the C++ extension), then run.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
# torch 2.13.0 (CPU) comes from this machine's disk; every other pin admits it.
PKGS   := torch==2.13.0 triton==3.9.0 ninja pybind11 pytest pytest-benchmark numpy matplotlib

.PHONY: all build test bench bench-quick inspect clean

all: test

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(PKGS) setuptools wheel
	touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(wildcard csrc/*)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

bench: $(BUILT)
	$(VPY) -m benchmarks.bench

bench-quick: $(BUILT)
	$(VPY) -m pytest -q benchmarks

inspect: $(BUILT)
	$(VPY) -m kdfast.inspect

clean:
	rm -rf build *.egg-info kdfast/*.so $(BUILT)
