"""Shared test setup: Triton's CPU interpreter, tolerances, backend availability, markers."""
import os

import torch

# Triton reads this at import; on a machine without a GPU the Triton kernels run on CPU tensors
# through the interpreter (slow: tests keep shapes small and use fp32/fp16).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import actshift  # noqa: E402
from actshift import backends  # noqa: E402

# Tolerances against the fp32 reference (rtol = atol), from the README's table.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN must match NaN: rows with no defined result (e.g. 0/0 ratios) propagate it everywhere."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol, equal_nan=True)


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors here; every one must be available in CI."""
    return ["reference", "cpu", "triton"]


def device_backend_params():
    """(device, backend) pairs: all CPU backends, plus the GPU ones marked `cuda`."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in cpu_backends()]
    for b in ("cuda", "triton", "reference"):
        params.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda))
    return params


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    # The Triton interpreter handles bf16 as raw integers; bf16 Triton runs only on a GPU.
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def cpu_triton_skip_reason() -> str:
    """Why Triton cannot run CPU tensors in this process ("" when it can). Interpreter mode is
    process-wide: on a GPU machine it stays off so that Triton compiles for the GPU, and the
    cpu x triton cases skip there (their cuda-triton twins run instead)."""
    if backends.triton_interpret() or not torch.cuda.is_available():
        return ""  # without a GPU the interpreter is on (above), and a missing one must fail
    return "Triton runs CPU tensors only under TRITON_INTERPRET=1, which stays off on a GPU machine"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    cpu_triton = cpu_triton_skip_reason()
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if cpu_triton and params.get("device") == "cpu" and params.get("backend") == "triton":
            item.add_marker(pytest.mark.skip(reason=cpu_triton))


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    actshift.set_backend(None)
    yield
    actshift.set_backend(None)


def require_backend(backend: str, device: str) -> None:
    """Fails (not skips) when a backend that must exist on this machine is missing; skips only
    Triton on CPU tensors where the interpreter is off (a GPU machine)."""
    if backend == "triton" and device == "cpu" and cpu_triton_skip_reason():
        pytest.skip(cpu_triton_skip_reason())
    reason = backends.unavailable_reason(backend, torch.device(device))
    assert not reason, f"backend {backend} unavailable on {device}: {reason}"
