"""Checks and dispatch helpers shared by the sparse ops' wrappers (sparse_threshold, sparse_linear,
relu_ffn). Messages name the argument; the C++ checks (csrc/sparse_checks.cpp) repeat them for
direct torch.ops calls."""
from __future__ import annotations

import importlib
import math
import numbers

import torch

from .. import backends
from . import _autograd
from ..backends import BackendUnavailableError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_rows(x, name: str = "x") -> torch.Tensor:
    """x [..., n] (fp32/fp16/bf16) as a contiguous [rows, n] view or copy."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dim (the channels)")
    # Explicit row count: reshape(-1, 0) cannot infer it when the channel dim is empty.
    return x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()


def check_like(t, name: str, x: torch.Tensor, shape: tuple, hint: str = "") -> None:
    """t must be a contiguous tensor of x's dtype and device with the given shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous{hint}")


def threshold_value(threshold, name: str = "threshold") -> float:
    """A Python-number threshold as a float; must be finite and >= 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(threshold).__name__}")
    t = float(threshold)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {t}")
    return t


def threshold_tensor(threshold, n: int, device: torch.device) -> torch.Tensor:
    """The threshold as the ops take it: fp32 [1] (a number) or [n] (per channel) on `device`.
    Values of a tensor are checked in eager mode only (under torch.compile the read would break
    the graph, and while a CUDA graph captures it would need a forbidden sync; the C++ CPU op still
    checks them)."""
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"threshold must be a float tensor or a number, got {threshold.dtype}")
        t = threshold.reshape(-1) if threshold.dim() == 0 else threshold
        if t.dim() != 1 or t.shape[0] not in (1, n):
            raise ValueError(f"threshold must be a number or a [{n}] tensor (one per channel), got shape {tuple(threshold.shape)}")
        if t.device != device:
            raise ValueError(f"threshold is on {t.device} but x is on {device}")
        t = t.to(torch.float32).contiguous()
        capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing and not bool((torch.isfinite(t) & (t >= 0)).all()):
            raise ValueError("threshold must be finite and >= 0 (found a negative, NaN or Inf value)")
        return t
    return torch.full((1,), threshold_value(threshold), dtype=torch.float32, device=device)


def triton_op(name: str):
    """torch.ops.actshift.<name>_triton, registering actshift.kernels.<name> on first use; raises
    BackendUnavailableError while that kernel module does not exist."""
    op_name = f"{name}_triton"
    if hasattr(torch.ops.actshift, op_name):
        return getattr(torch.ops.actshift, op_name)
    module = f"actshift.kernels.{name}"
    try:
        kernel = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise BackendUnavailableError(f"backend 'triton' is unavailable for {name}: {module} is not built yet") from None
    kernel.register()
    _autograd.register(op_name)
    return getattr(torch.ops.actshift, op_name)


def register_triton_early(name: str) -> None:
    """Registers the Triton op at import where Triton can run (as ops/steer.py does), so that
    torch.compile never traces the registration; a kernel module not built yet is left for the
    first call to report."""
    if torch.cuda.is_available() or backends.triton_interpret():
        try:
            triton_op(name)
        except BackendUnavailableError:
            pass
