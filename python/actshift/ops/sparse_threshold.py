"""The `sparse_threshold` op: public wrapper, argument checks, backend dispatch, fake impl.

Backends: "cpu" and "cuda" call torch.ops.actshift.sparse_threshold (C++); "triton" calls
torch.ops.actshift.sparse_threshold_triton (kernels/sparse_threshold.py); "reference" is
reference.sparse_threshold.
"""
from __future__ import annotations

import torch

from .. import _ext, backends, reference
from . import _autograd
from ._fake import same_device
from ._sparse import as_rows, register_triton_early, threshold_tensor, triton_op

if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::sparse_threshold")
    def _sparse_threshold_fake(x, threshold):
        same_device("sparse_threshold", x, threshold=threshold)
        torch._check(x.dim() == 2, lambda: "sparse_threshold: x must be [rows, n]")
        return x.new_empty(x.shape)

    _autograd.register("sparse_threshold")


register_triton_early("sparse_threshold")


def sparse_threshold(x: torch.Tensor, threshold, *, backend: str = "auto") -> torch.Tensor:
    """Zeroes small activations: y = x where |x| > t else 0 (strictly greater; NaN stays NaN).

    Args:
        x: [..., n] fp32/fp16/bf16, any leading dims.
        threshold: t >= 0, finite: a number, or a float tensor [n] with one threshold per channel
            (compared in fp32).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        y shaped like x, in x's dtype.
    """
    x2 = as_rows(x)
    t = threshold_tensor(threshold, x2.shape[1], x2.device)
    name = backends.resolve(backend, x2.device)
    if name == "reference":
        y = reference.sparse_threshold(x2, t)
    elif name == "triton":
        y = _autograd.call(triton_op("sparse_threshold"), x2, t)
    else:
        y = _autograd.call(torch.ops.actshift.sparse_threshold, x2, t)
    return y.view(x.shape)
