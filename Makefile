# Every target works from a fresh clone: it finds or makes a Python with torch, installs what the
# tests and benchmarks need, builds the extension (again only when csrc/ or setup changed; the
# install is editable, so Python edits need no rebuild), then runs.
#
#   make bench       build, run the benchmark suite on the default device, print the table
#   make test        build, run the test suite (CUDA tests skip without a GPU)
#   make test-gpu    build, run the CUDA and Triton-on-GPU tests (fails without a GPU)
#   make cuda-check  compile csrc/cuda torch-free for sm_80 and sm_90a, warnings as errors
#   make test-asan   build the CPU extension with ASan + UBSan into build/asan (the normal build is
#                    left alone) and run the CPU-op tests on it (~12 min to build on 2 cores)
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

.PHONY: bench test test-gpu build deps cuda-check test-asan clean

bench: build
	$(PY) -m actshift.cli bench

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

cuda-check:
	cmake -S . -B .cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build .cmake-build

# test-asan: the extension compiled with AddressSanitizer + UBSan (any UB aborts the run) into
# build/asan/lib, then a tree build/asan/pkg/actshift of symlinks to the sources with that binary,
# first on PYTHONPATH; Python itself is not instrumented, so the ASan runtime is preloaded, with
# libstdc++ (else ASan's __cxa_throw interceptor finds no real one and every C++ exception aborts),
# leak checks off (the interpreter never frees everything). --capture=sys leaves fd 2 alone, so a
# sanitizer report that ends the process is not lost with pytest's captured output. setup.py
# rewrites _build_info.json, so the normal build's copy is put back.
SANITIZE := -fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer
ASAN_TESTS := tests/test_steer.py tests/test_steer_program.py tests/test_percentile.py \
	tests/test_sparse_threshold.py tests/test_sparse_linear.py tests/test_relu_ffn.py \
	tests/test_op_boundaries.py tests/test_differential.py
ASAN := build/asan
ASAN_ENV = ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	PYTHONPATH=$(CURDIR)/$(ASAN)/pkg

test-asan: deps
	@mkdir -p $(ASAN)
	@cp python/actshift/_build_info.json $(ASAN)/normal_build_info.json 2>/dev/null || rm -f $(ASAN)/normal_build_info.json
	ACTSHIFT_NO_CUDA=1 CFLAGS="$(SANITIZE)" LDFLAGS="$(SANITIZE)" $(PY) setup.py -q build_ext \
		--build-lib $(ASAN)/lib --build-temp $(ASAN)/tmp
	@mv python/actshift/_build_info.json $(ASAN)/asan_build_info.json
	@if [ -f $(ASAN)/normal_build_info.json ]; then cp $(ASAN)/normal_build_info.json python/actshift/_build_info.json; fi
	rm -rf $(ASAN)/pkg && mkdir -p $(ASAN)/pkg && cp -rs $(CURDIR)/python/actshift $(ASAN)/pkg/actshift
	rm -f $(ASAN)/pkg/actshift/_C*.so $(ASAN)/pkg/actshift/_build_info.json
	cp $(ASAN)/lib/actshift/_C*.so $(ASAN)/pkg/actshift/
	cp $(ASAN)/asan_build_info.json $(ASAN)/pkg/actshift/_build_info.json
	ln -s $(CURDIR)/kernels $(ASAN)/pkg/actshift/kernels
	ln -s $(CURDIR)/benchmarks $(ASAN)/pkg/actshift/benchmarks
	$(ASAN_ENV) $(PY) -c 'import actshift._C as c, sys; sys.exit(0 if "/$(ASAN)/pkg/" in c.__file__ else "not the ASan build: " + c.__file__)'
	$(ASAN_ENV) $(PY) -m pytest $(ASAN_TESTS) -q -p no:cacheprovider --capture=sys

clean:
	rm -rf build .cmake-build *.egg-info python/actshift/_C*.so python/actshift/_build_info.json
