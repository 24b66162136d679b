"""Backend registry and selection.

Backends: "reference" (pure PyTorch, always), "cpu" (C++ extension, CPU tensors), "triton" (Triton
kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for tests), "cuda" (C++/CUDA
extension). Selection order: the call's `backend=` argument, then `set_backend(...)`, then the
ACTSHIFT_BACKEND environment variable (read at import and by `set_backend(None)`), then "auto". An explicitly named backend that cannot run the
call raises BackendUnavailableError with the reason; only "auto" chooses among available ones.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)
_override: str | None = None
_env: str | None = None  # ACTSHIFT_BACKEND as last read; None when unset


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or for this tensor."""


def _check_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{argname} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


def _read_env() -> None:
    global _env
    value = os.environ.get("ACTSHIFT_BACKEND") or None
    _env = None if value is None else _check_name(value, "ACTSHIFT_BACKEND")


def set_backend(name: str | None) -> None:
    """Sets the process-wide backend: "auto", one of BACKENDS, or None to drop the override and
    re-read the ACTSHIFT_BACKEND environment variable."""
    global _override
    if name is None:
        _override = None
        _read_env()
    else:
        _override = _check_name(name)


def get_backend() -> str:
    """The backend that applies when a call passes backend="auto"."""
    if _override is not None:
        return _override
    return _env or "auto"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device | None = None) -> str:
    """Why `name` cannot run (on `device`, when given); "" when it can."""
    if name == "reference":
        return ""
    if name == "cpu":
        if not _ext.EXT_LOADED:
            return f"the C++ extension is not loaded: {_ext.EXT_REASON}"
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs CPU tensors only, got a {device.type} tensor"
        return ""
    if name == "cuda":
        if not _ext.EXT_LOADED:
            return f"the C++ extension is not loaded: {_ext.EXT_REASON}"
        if not _ext.build_info().get("cuda"):
            return f"the CUDA kernels were not built: {_ext.build_info().get('cuda_reason', 'unknown')}"
        if device is not None and device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got a {device.type} tensor"
        return ""
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device is not None and device.type == "cpu" and not triton_interpret():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"Triton does not run {device.type} tensors"
        return ""
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


# "auto" order per device type, fastest first, from benchmarks/results (see README, "Backends"):
# the C++ kernels beat Triton at the small decode shapes where launch overhead dominates and match
# it at large shapes; the reference is the fallback that always works.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


_auto_cache: dict[str, str] = {}


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for one call on `device`."""
    if backend == "auto" and _override is None and _env is None:
        # Hot path (every decode step): availability does not change within a process.
        cached = _auto_cache.get(device.type)
        if cached is None:
            cached = _auto_cache[device.type] = _pick_auto(device)
        return cached
    name = _check_name(backend)
    if name == "auto":
        name = get_backend()
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
        return name
    return _pick_auto(device)


def _pick_auto(device: torch.device) -> str:
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if not unavailable_reason(candidate, device):
            return candidate
    return "reference"


_read_env()
