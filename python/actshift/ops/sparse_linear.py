"""The `sparse_linear` op: public wrapper, argument checks, backend dispatch, fake impl.

Backends: "cpu" and "cuda" call torch.ops.actshift.sparse_linear (C++); "triton" calls
torch.ops.actshift.sparse_linear_triton (kernels/sparse_linear.py); "reference" is
reference.sparse_linear.
"""
from __future__ import annotations

import torch

from .. import _ext, backends, reference
from . import _autograd
from ._fake import same_device
from ._sparse import as_rows, check_like, register_triton_early, threshold_tensor, triton_op

if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::sparse_linear")
    def _sparse_linear_fake(x, weight_t, threshold, bias):
        same_device("sparse_linear", x, weight_t=weight_t, threshold=threshold, bias=bias)
        torch._check(x.dim() == 2, lambda: "sparse_linear: x must be [rows, in]")
        return x.new_empty((x.shape[0], weight_t.shape[1]))

    _autograd.register("sparse_linear")


register_triton_early("sparse_linear")


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """A linear layer on magnitude-thresholded inputs that skips the weights of zeroed inputs:
    y = sparse_threshold(x, t) @ weight_t + bias, with fp32 accumulation.

    For up to 16 rows the kernels read only the weight_t rows of inputs active (|x| > t) in some
    row (the union); more rows, or a dense union, fall back to a dense product.

    Args:
        x: [..., in] fp32/fp16/bf16, any leading dims.
        weight_t: [in, out] contiguous, x's dtype: `linear.weight.t().contiguous()`, so each
            input's weights are one contiguous row.
        threshold: t >= 0, finite: a number or a float tensor [in] (per input channel).
        bias: [out] of x's dtype, or None.
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        y [..., out] in x's dtype.
    """
    x2 = as_rows(x)
    n = x2.shape[1]
    if not isinstance(weight_t, torch.Tensor) or weight_t.dim() != 2:
        raise ValueError(f"weight_t must be a 2-d [in, out] tensor, got {getattr(weight_t, 'shape', type(weight_t).__name__)}")
    out = weight_t.shape[1]
    check_like(weight_t, "weight_t", x2, (n, out), " (pass linear.weight.t().contiguous(); in = x's last dim)")
    if bias is not None:
        check_like(bias, "bias", x2, (out,))
    t = threshold_tensor(threshold, n, x2.device)
    name = backends.resolve(backend, x2.device)
    if name == "reference":
        y = reference.sparse_linear(x2, weight_t, t, bias)
    elif name == "triton":
        y = _autograd.call(triton_op("sparse_linear"), x2, weight_t, t, bias)
    else:
        y = _autograd.call(torch.ops.actshift.sparse_linear, x2, weight_t, t, bias)
    return y.view(*x.shape[:-1], out)
