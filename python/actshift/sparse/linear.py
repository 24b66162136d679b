"""`SparseLinear`: a drop-in for nn.Linear / transformers Conv1D running actshift.sparse_linear at decode."""
from __future__ import annotations

import torch
from torch import nn

from .sites import linear_weight_t
from .thresholds import check_threshold

# Decode rule shared by the module swaps: the sparse kernels run when the input is one new token per
# sequence ([batch, 1, d], batch <= 16; a 2-D input counts as rows <= 16). Anything else (prefill,
# scoring a prompt) runs the original dense module, bit-exactly: the union of active inputs across
# many rows is dense anyway, and the kernels fall back to a dense product there. A 2-D input
# carries no sequence dim (OPT flattens before fc1), so a short prompt of <= 16 rows runs the
# kernels too, which is exact for relu_ffn and within rounding of the dense product otherwise.
DECODE_MAX_ROWS = 16


def is_decode(x: torch.Tensor) -> bool:
    """True for a decode step: seq == 1 (or a 2-D input) and at most DECODE_MAX_ROWS rows."""
    if x.dim() >= 3 and x.shape[-2] != 1:
        return False
    rows = 1
    for s in x.shape[:-1]:
        rows *= s
    return rows <= DECODE_MAX_ROWS


class SparseLinear(nn.Module):
    """y = threshold(x, t) @ W^T + b at decode (actshift.sparse_linear: only the weight rows of the
    active inputs are read), the original module's dense product otherwise.

    Keeps `weight_t` = W^T contiguous ([in, out]; a copy for nn.Linear, the weight itself for
    Conv1D, whose weight is already [in, out]) and the original module as `dense` (used for prefill
    and restored by unpatch). prefill="sparse" thresholds x before the dense product too, as TEAL's
    accuracy evaluation does; the default "dense" leaves prefill exact.
    """

    def __init__(self, original: nn.Module, threshold: float, *, prefill: str = "dense", backend: str = "auto"):
        super().__init__()
        weight_t, self.in_features, self.out_features = linear_weight_t(original)
        if prefill not in ("dense", "sparse"):
            raise ValueError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
        self.dense = original
        self.register_buffer("weight_t", weight_t.detach().contiguous(), persistent=False)
        self.threshold = check_threshold(threshold, "threshold")
        self.prefill = prefill
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import actshift

        if is_decode(x):
            return actshift.sparse_linear(x, self.weight_t, self.threshold, self.dense.bias, backend=self.backend)
        if self.prefill == "sparse":
            x = actshift.sparse_threshold(x, self.threshold, backend=self.backend)
        return self.dense(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, prefill={self.prefill}"
