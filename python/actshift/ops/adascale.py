"""`adascale_stats`: AdaSCALE's per-sample shift statistics Q and C_o in one fused pass."""
from __future__ import annotations

import numbers

import torch

from .. import _ext, backends, reference
from . import _autograd
from .percentile import TRITON_MAX_D, _triton_ready, as_rows
from ._fake import same_device
from .percentile import TRITON_MAX_D, as_rows

if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::adascale_stats")
    def _adascale_fake(z, z_perturbed, k1, k2):
        same_device("adascale_stats", z, x_name="z", z_perturbed=z_perturbed)
        return z.new_empty((z.shape[0],), dtype=torch.float32), z.new_empty((z.shape[0],), dtype=torch.float32)

    _autograd.register("adascale_stats")


def adascale_stats(z: torch.Tensor, z_perturbed: torch.Tensor, k1: int, k2: int, *, backend: str = "auto"):
    """Q = Σ|z − z̃| over the top-k1 positions of z and C_o = Σ relu(z̃) over its top-k2 positions
    (fp32 [N] each; ties at the k-th value kept in index order)."""
    z2, p2 = as_rows(z, "z"), as_rows(z_perturbed, "z_perturbed")
    if p2.shape != z2.shape or p2.dtype != z2.dtype or p2.device != z2.device:
        raise ValueError(f"z_perturbed must match z ({tuple(z2.shape)}, {z2.dtype}, {z2.device}), "
                         f"got {tuple(p2.shape)}, {p2.dtype}, {p2.device}")
    d = z2.shape[1]
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d:
            raise ValueError(f"{name} must be an integer in [1, {d}], got {k!r}")
    name = backends.resolve(backend, z2.device)
    if name == "reference":
        return reference.adascale_stats(z2, p2, int(k1), int(k2))
    if name == "triton":
        if d > TRITON_MAX_D:
            raise ValueError(f"z has {d} features; the triton backend supports up to {TRITON_MAX_D}")
        _triton_ready()
        return _autograd.call(torch.ops.actshift.adascale_stats_triton, z2, p2, int(k1), int(k2))
    return _autograd.call(torch.ops.actshift.adascale_stats, z2, p2, int(k1), int(k2))
