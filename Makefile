# Every target works from a fresh clone: it finds or makes a Python with torch, installs what the
# tests and benchmarks need, builds the extension (again only when csrc/ or setup changed; the
# install is editable, so Python edits need no rebuild), then runs.
#
#   make bench       build, run the benchmark suite on the default device, print the table (a run
#                    goes to benchmarks/results/runs/; BENCH_ARGS=--update-results rewrites the committed CSV)
#   make test        build, run the test suite (CUDA tests skip without a GPU)
#   make test-gpu    build, run the CUDA and Triton-on-GPU tests (fails without a GPU)
#   make cuda-check  compile csrc/cuda torch-free for sm_80 and sm_90a, warnings as errors
#   make gpu-check   on a lent GPU, in <= 8 min: build for its arch, GPU tests, bench every op, write
#                    benchmarks/results/cuda.csv/.png + logs (scripts/gpu_check.sh; a dry run without GPU)
#
# A Python that already imports torch is reused (GPU machines ship a CUDA torch); otherwise a
# .venv gets the pinned CPU torch. Set PYTHON to choose the interpreter.

PYTHON ?= python3
VENV := .venv
HAS_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_TORCH),yes)
PY := $(PYTHON)
else
PY := $(VENV)/bin/python
endif
# Packages the tests and benchmarks import, installed only where missing.
DEPS := numpy pytest hypothesis transformers safetensors gguf matplotlib scikit-learn setuptools wheel ninja
PINNED := torch==2.13.0 triton==3.9.0
STAMP := build/.stamp-$(shell echo $(PY) | tr '/' '_')
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: bench test test-gpu gpu-check build deps cuda-check clean

bench: build
	$(PY) -m actshift.cli bench $(BENCH_ARGS)

test: build
	$(PY) -m pytest tests -q

test-gpu: build
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU visible to torch')"
	$(PY) -m pytest tests -q -m "cuda or triton" -rs

build: $(STAMP)

$(STAMP): $(SOURCES) | deps
	$(PY) -m pip install --no-build-isolation --no-deps -e . -q
	@mkdir -p build && touch $@

deps:
ifneq ($(HAS_TORCH),yes)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, triton" >/dev/null 2>&1 || $(PY) -m pip install -q $(PINNED)
endif
	@missing=$$($(PY) scripts/missing_modules.py $(DEPS)); \
	if [ -n "$$missing" ]; then echo "installing $$missing"; $(PY) -m pip install -q $$missing; fi

gpu-check: deps
	PY=$(PY) scripts/gpu_check.sh

cuda-check:
	cmake -S . -B .cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build .cmake-build

clean:
	rm -rf build .cmake-build *.egg-info python/actshift/_C*.so python/actshift/_build_info.json
