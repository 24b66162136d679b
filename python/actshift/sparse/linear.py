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


class Counters:
    """What one swapped module did, counted on eager calls (not while torch.compile traces, so a
    compiled graph carries no Python side effects): `sparse_calls` ran the actshift kernel (decode
    steps), `dense_calls` ran the original module (prefill). With `count_zeros = True` a
    SparseLinear also counts the inputs its sparse calls zeroed (|x| <= t), which costs a reduction
    and a host sync per call, hence off by default; `sparsity` is then zeros / inputs."""

    __slots__ = ("sparse_calls", "dense_calls", "zeros", "inputs", "count_zeros")

    def __init__(self) -> None:
        self.count_zeros = False
        self.reset()

    def reset(self) -> None:
        self.sparse_calls = self.dense_calls = self.zeros = self.inputs = 0

    def tally(self, sparse: bool, x: torch.Tensor | None = None, threshold: float = 0.0) -> None:
        if torch.compiler.is_compiling():
            return
        if not sparse:
            self.dense_calls += 1
            return
        self.sparse_calls += 1
        if self.count_zeros and x is not None:
            self.zeros += int((x.abs() <= threshold).sum())
            self.inputs += x.numel()

    @property
    def sparsity(self) -> float | None:
        """Share of inputs zeroed over the counted sparse calls; None when none were counted."""
        return self.zeros / self.inputs if self.inputs else None

    def __repr__(self) -> str:
        s = "" if self.sparsity is None else f", sparsity={100 * self.sparsity:.1f}%"
        return f"Counters(sparse_calls={self.sparse_calls}, dense_calls={self.dense_calls}{s})"


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
        self.counters = Counters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import actshift

        decode = is_decode(x)
        self.counters.tally(decode, x, self.threshold)
        if decode:
            return actshift.sparse_linear(x, self.weight_t, self.threshold, self.dense.bias, backend=self.backend)
        if self.prefill == "sparse":
            x = actshift.sparse_threshold(x, self.threshold, backend=self.backend)
        return self.dense(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, prefill={self.prefill}"
