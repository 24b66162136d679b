"""`percentile_scale`: ASH, SCALE and ReAct activation shaping per sample, exact and fused.

Backends: "cpu" and "cuda" call torch.ops.actshift.percentile_scale (C++); "triton" calls
torch.ops.actshift.percentile_scale_triton (kernels/percentile.py); "reference" is
reference.percentile_scale. The host turns the percentile into the per-row count k once, so every
backend keeps exactly the same number of elements.
"""
from __future__ import annotations

import numbers

import torch

from .. import _ext, backends, reference
from . import _autograd
from ._fake import same_device

METHODS = ("scale", "ash_p", "ash_b", "ash_s", "react")
_CODES = {name: i for i, name in enumerate(reference.PERCENTILE_METHODS)}  # ratio=0 ... react=5
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_D = 16384  # kernels/percentile.py keeps a whole row in one program's registers


if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::percentile_scale")
    def _percentile_fake(z, k, method, clip):
        same_device("percentile_scale", z, x_name="z", k=k)
        n, d = z.shape
        y = z.new_empty((0 if method == _CODES["ratio"] else n, d))
        r = z.new_empty((0 if method == _CODES["react"] else n,), dtype=torch.float32)
        return y, r

    _autograd.register("percentile_scale")


def _triton_ready() -> None:
    if not hasattr(torch.ops.actshift, "percentile_scale_triton"):
        from ..kernels import percentile as triton_percentile

        triton_percentile.register()
        _autograd.register("percentile_scale_triton")
        _autograd.register("adascale_stats_triton")


def as_rows(z, name: str = "z") -> torch.Tensor:
    """z as a contiguous [N, D] view or copy; accepts [N, D] and [N, D, 1, 1] (pooled CNN features)."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {z.dtype}")
    if z.dim() == 4 and z.shape[2:] == (1, 1):
        z = z.reshape(z.shape[0], z.shape[1])
    if z.dim() != 2:
        raise ValueError(f"{name} must be [N, D] or [N, D, 1, 1] features, got shape {tuple(z.shape)}")
    if z.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature (D >= 1)")
    return z.contiguous()


def percentile_k(d: int, percentile, n: int, device: torch.device) -> torch.Tensor:
    """k = d − round(d·p/100) per row (round half to even), as int32 [n]; p is a number in (0, 100)
    or a tensor of n such numbers. Raises ValueError when p is out of range or k rounds to 0.

    A per-row tensor is range-checked in eager mode only (the check reads its values); under
    torch.compile out-of-range percentiles are clamped to k in [1, d] instead of rejected."""
    if isinstance(percentile, numbers.Real) and not isinstance(percentile, bool):
        p = float(percentile)
        if not 0 < p < 100:  # also rejects NaN
            raise ValueError(f"percentile must be in (0, 100) (exclusive), got {p}")
        k = d - round(d * p / 100)  # Python rounds half to even, like numpy and torch
        if k < 1:
            raise ValueError(f"percentile {p} keeps no element of {d} features: k = d - round(d*p/100) rounds to 0")
        return torch.full((n,), k, dtype=torch.int32, device=device)
    if not isinstance(percentile, torch.Tensor) or percentile.dtype == torch.bool or percentile.is_complex():
        raise TypeError(f"percentile must be a number in (0, 100) or a tensor of them, got {type(percentile).__name__}")
    if percentile.dim() == 0:
        percentile = percentile.expand(n)
    if percentile.shape != (n,):
        raise ValueError(f"percentile must be a number or one value per row ({n}), got shape {tuple(percentile.shape)}")
    p = percentile.to(device=device, dtype=torch.float64)
    k = d - torch.round(d * p / 100)
    if n and not torch.compiler.is_compiling():
        inside = (p > 0) & (p < 100)
        if not bool(inside.all()):
            raise ValueError(f"percentile must be in (0, 100) (exclusive), got {p[~inside][0].item()}")
        if int(k.min()) < 1:
            raise ValueError(f"percentile {p[k < 1].min().item()} keeps no element of {d} features: "
                             "k = d - round(d*p/100) rounds to 0")
    return k.clamp(1, d).to(torch.int32)


def refuse_fraction(percentile, allow_small_percentile: bool, name: str = "percentile") -> None:
    """ValueError for a percentile number below 1, unless allow_small_percentile: 0.85 is almost
    always a torch.quantile-style fraction meant as 85, which would silently keep nearly every
    element. Tensors (per-row percentiles, computed by code) are not checked."""
    if not isinstance(allow_small_percentile, bool):
        raise TypeError(f"allow_small_percentile must be a bool, got {type(allow_small_percentile).__name__}")
    if (not allow_small_percentile and isinstance(percentile, numbers.Real) and not isinstance(percentile, bool)
            and 0 < percentile < 1):
        raise ValueError(
            f"{name}={percentile} looks like a fraction: percentiles here are in (0, 100), as in numpy.percentile "
            f"(torch.quantile's q=0.85 is {name}=85). Pass {name}={percentile * 100:g}, or "
            f"allow_small_percentile=True if you mean the {percentile}th percentile")


def _check_clip(clip) -> float | None:
    if clip is None:
        return None
    if isinstance(clip, torch.Tensor) and clip.numel() == 1:
        clip = clip.item()
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise TypeError(f"clip must be a number, got {type(clip).__name__}")
    clip = float(clip)
    if clip != clip or clip in (float("inf"), float("-inf")):
        raise ValueError(f"clip must be finite, got {clip}")
    return clip


def run_percentile(z2: torch.Tensor, k: torch.Tensor | None, method: str, clip: float | None, backend: str):
    """Runs the op on validated [N, D] rows; returns (y or None, r or None)."""
    code = _CODES[method]
    if k is None:  # react selects nothing; the kernels still take a k tensor
        k = torch.ones(z2.shape[0], dtype=torch.int32, device=z2.device)
    name = backends.resolve(backend, z2.device)
    if name == "reference":
        return reference.percentile_scale(z2, k, method, clip)
    if name == "triton":
        if z2.shape[1] > TRITON_MAX_D:
            raise ValueError(f"z has {z2.shape[1]} features; the triton backend holds a row in one program, "
                             f"up to {TRITON_MAX_D} (use backend='cuda' or 'cpu')")
        _triton_ready()
        y, r = _autograd.call(torch.ops.actshift.percentile_scale_triton, z2, k, code, clip)
    else:
        y, r = _autograd.call(torch.ops.actshift.percentile_scale, z2, k, code, clip)
    return (None if method == "ratio" else y), (None if method == "react" else r)


def percentile_scale(
    z: torch.Tensor,
    percentile=None,
    method: str = "scale",
    *,
    clip: float | None = None,
    return_ratio: bool = False,
    allow_small_percentile: bool = False,
    backend: str = "auto",
):
    """Activation shaping of each sample's features, exact, in one fused pass.

    Args:
        z: features [N, D] or [N, D, 1, 1] (fp32/fp16/bf16), e.g. a CNN's pooled penultimate layer.
        percentile: p in (0, 100), a number or a tensor with one p per row (AdaSCALE); the kernel
            keeps k = D − round(D·p/100) elements (round half to even). Ignored by "react".
        method: "scale" (z·e^r), "ash_p" (keep the top k, zero the rest), "ash_b" (kept ← s1/k),
            "ash_s" (ash_p·e^r) or "react" (min(z, clip)); r = s1/s2 = Σz / Σ top-k, in fp32.
        clip: ReAct's threshold c; with another method it clips z first (ReAct + ASH).
        return_ratio: also return r [N] (fp32).
        allow_small_percentile: accept a percentile number below 1 (by default refused with a
            ValueError: 0.85 is read as the 0.85th percentile, so it is most likely a fraction
            meant as 85).

    Ties at the k-th value are kept in index order (deterministic; torch.topk may keep other tied
    positions, which changes ASH outputs but never s2, r or SCALE). A row holding NaN/Inf gives
    NaN outputs and r = NaN.

    Returns:
        y shaped like z, or (y, r) with return_ratio.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    shape = z.shape if isinstance(z, torch.Tensor) else None
    z2 = as_rows(z)
    clip = _check_clip(clip)
    if method == "react":
        if clip is None:
            raise ValueError("method 'react' needs clip (ReAct's threshold c)")
        if return_ratio:
            raise ValueError("return_ratio is not defined for method 'react' (it selects nothing)")
        k = None
    else:
        if percentile is None:
            raise ValueError(f"method {method!r} needs a percentile in (0, 100)")
        refuse_fraction(percentile, allow_small_percentile)
        k = percentile_k(z2.shape[1], percentile, z2.shape[0], z2.device)
    y, r = run_percentile(z2, k, method, clip, backend)
    y = y.view(shape)
    return (y, r) if return_ratio else y


def scale_ratio(z: torch.Tensor, percentile, *, clip: float | None = None, allow_small_percentile: bool = False,
                backend: str = "auto") -> torch.Tensor:
    """r = Σz / Σ top-k(z) per row (fp32), without writing shaped features: what SCALE and AdaSCALE
    need to scale logits instead of features (exp(r)·(W z) + b). Percentile and
    allow_small_percentile as in `percentile_scale`."""
    z2 = as_rows(z)
    refuse_fraction(percentile, allow_small_percentile)
    k = percentile_k(z2.shape[1], percentile, z2.shape[0], z2.device)
    return run_percentile(z2, k, "ratio", _check_clip(clip), backend)[1]
