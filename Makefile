# kdfast: `make test` and `make bench` do all set-up on a fresh machine (a .venv with torch 2.13.0,
# triton and the build tools, then the C++ extension), then run.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
# torch 2.13.0 (CPU) comes from this machine's disk; every other pin admits it. The Hugging Face
# extras (kdfast[hf]: tests/test_integrations.py, benchmarks/bench_trl.py) resolve in the same pip
# call as torch==2.13.0, so pip never pulls another torch for them.
PKGS   := torch==2.13.0 triton==3.9.0 ninja pybind11 pytest pytest-benchmark numpy matplotlib \
          scikit-learn transformers trl datasets tokenizers
# examples/imagenet_distill.py needs torchvision, which does not import beside torch 2.13.0: its
# smoke test gets a venv of its own with the newest pair on this machine's disk.
VVENV  := .venv-vision
VVPY   := $(VVENV)/bin/python
VPKGS  := torch==2.14.1 torchvision==0.29.1 ninja pybind11 setuptools wheel numpy
VSRC   := build/vision-src

# The GPU path (issue 13): `make gpu` on a CUDA machine uses the python3 there (no venv, no network;
# PyTorch with CUDA and Triton preinstalled): the C++ extension builds in the background (MAX_JOBS =
# the cores; KDFAST_SKIP_BUILD=1 skips it: nothing on the GPU path loads it), then the CUDA test
# cases (tests/test_cuda.py, TRITON_INTERPRET=0), then the GPU benchmark -> benchmarks/RESULTS-gpu.md
# and results-gpu.json, within ~8-9 minutes (benchmarks/run_gpu.py). `make gpu-dry`: the same path
# minus the build on the CPU (Triton interpreter, tiny shapes, output in a temp dir); `make test`
# runs it. `make gpu-wheels` (needs network) puts the Liger-Kernel wheel, an optional baseline, in
# .whl/: carry it to the GPU machine and `make gpu` installs it into build/gpu/site.
GPU_PYTHON ?= python3

.PHONY: all build test bench bench-quick inspect vision-smoke clean gpu gpu-dry gpu-wheels

all: test

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(PKGS) setuptools wheel
	touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(wildcard csrc/* csrc/kinds/*)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(VPY) -m benchmarks.run_gpu --dry
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

gpu:
	$(GPU_PYTHON) -m benchmarks.run_gpu

gpu-dry: $(BUILT)
	$(VPY) -m benchmarks.run_gpu --dry

gpu-wheels: $(DEPS)
	$(VPY) -m pip download -q --no-deps -d .whl liger-kernel

bench: $(BUILT)
	$(VPY) -m benchmarks.bench_fused_linear --json benchmarks/fused_linear.json
	$(VPY) -m benchmarks.bench_vocab_parallel --json benchmarks/vocab_parallel.json
	$(VPY) -m benchmarks.bench_multi_teacher --json benchmarks/multi_teacher.json
	$(VPY) -m benchmarks.bench_steady --json benchmarks/steady.json
	$(VPY) -m benchmarks.bench

bench-quick: $(BUILT)
	$(VPY) -m pytest -q benchmarks

inspect: $(BUILT)
	$(VPY) -m kdfast.aot

# kdfast built into .venv-vision (non-editable) from a copy of the sources in $(VSRC), so its build
# directory and extension never touch build/ or kdfast/_C*.so of the main .venv.
$(VVENV)/.ext-built: setup.py pyproject.toml $(wildcard csrc/* csrc/kinds/*) $(wildcard kdfast/*.py kdfast/*/*.py)
	test -x $(VVPY) || $(PYTHON) -m venv $(VVENV)
	$(VVPY) -m pip install -q $(VPKGS)
	rm -rf $(VSRC)/csrc $(VSRC)/kdfast && mkdir -p $(VSRC)
	tar -c --exclude='*.so' --exclude=__pycache__ setup.py pyproject.toml README.md csrc kdfast | tar -x -C $(VSRC)
	cd $(VSRC) && ../../$(VVPY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

# FakeData, a few steps: the fused kd in float32 (--amp auto on a CPU without native bf16), then dkd
# under bf16 autocast (slow on such a CPU, hence the smaller size). One torch thread and one loader
# worker: on a shared 2-core machine a second OpenMP thread spins on a busy core (30x slower steps).
SMOKE  := $(VVPY) examples/imagenet_distill.py --fake-data --threads 1 --workers 1
vision-smoke: $(VVENV)/.ext-built
	$(SMOKE) --image-size 64 --batch-size 32 --steps 3 --loss kd --backend auto
	$(SMOKE) --image-size 32 --batch-size 16 --steps 2 --loss dkd --backend auto --amp bf16

clean:
	rm -rf build *.egg-info kdfast/*.so $(BUILT)
