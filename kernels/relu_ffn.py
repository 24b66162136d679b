"""Triton kernels of the `relu_ffn` op (ReLU-sparse FFN skipping, and CATS), and its
`actshift::relu_ffn_triton` op.

Math (the contract of actshift.reference.relu_ffn), fp32 throughout, for x [rows, d] and weights
w_gate, w_up, w_down_t all [ffn, d] (w_down_t = down_proj.weight.t().contiguous()):
    g = w_gate x + b_gate
    gated (w_up given):   u = w_up x + b_up,  h = a(g, u)     non-gated: h = a(g)
        act 0 relu:    a = relu(g) [* u]
        act 1 fatrelu: a = (g if g > threshold else 0) [* u]
        act 2 relu2:   a = relu(g)^2 [* u]
        act 3 drelu:   a = relu(g) * relu(u)                         (gated only)
        act 4 cats:    s = silu(g); a = (s if |s| > threshold else 0) * u   (gated only)
    y = w_down_t^T h + b_down, cast once to x's dtype.
A neuron is active in a row iff its gate activation (the factor from g) is nonzero.

Design, two kernels plus the split-K machinery of kernels/sparse_linear.py:
1. `_gate_up_kernel`, one program per (block of BLOCK_F neurons, block of BLOCK_R rows): the dense
   gate GEMV over w_gate rows (contiguous along d) with the activation fused, then, in the same
   program, the up GEMV reading only the w_up rows of neurons active in some row of the block
   (masked loads: inactive rows cost no traffic; a block with no active neuron reads no w_up at
   all). It writes h in fp32 (exactly 0 for inactive neurons). Keeping the gate and up in one
   program reuses x from registers/L1 and avoids an index-compaction pass: the grid is static,
   which CUDA graphs need.
2. The down projection is `splitk_accumulate` over w_down_t with the predicate h != 0: the
   rows of w_down_t of neurons inactive in every row of a block are never read; fp32 atomics into
   a workspace, then `finalize` adds b_down and casts.
Rows share each loaded weight tile (tl.dot for 2..8 rows), so a batch reads the union of its
active neurons once. Past 8 rows (MAX_SPARSE_ROWS) the gate/up kernel switches to 64-row tiles
(the down projection past 16): the dense fallback, still fp32 throughout (a cuBLAS product would
round g, u or h to x's dtype).

The launchers do no validation and no host synchronisation, so they run inside
`torch.library.triton_op`, torch.compile(fullgraph=True) and CUDA graphs.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op
from ._math import exp
from .sparse_linear import finalize, splitk_accumulate

# Activation codes of the schema's `act` (constexpr, so the branches compile away).
_RELU = tl.constexpr(0)
_FATRELU = tl.constexpr(1)
_RELU2 = tl.constexpr(2)
_DRELU = tl.constexpr(3)
_CATS = tl.constexpr(4)

# The contract's crossover: the union of active neurons is taken over at most this many rows.
# Not measured on a GPU (none was available to this branch): sparsity.md section 7.3 puts the
# union of 8 rows at ~57% density for 90%-sparse ReLU models, and ProSparse's batched kernel
# stops beating dense at 5 rows.
MAX_SPARSE_ROWS = 8


def _tiles(rows: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_R, BLOCK_F, BLOCK_D, USE_DOT, num_warps) of the gate/up kernel for `rows` rows of x
    of `dtype`.

    One row: a plain GEMV over 16 neurons per program (ffn 11008..28672 gives 688..1792 programs
    at decode), 256 d per step (512 contiguous bytes of each fp16 weight row). 2..8 rows: one
    tl.dot tile of 16 rows (its minimum M). More rows: 64 x 64 tiles, a dense tiled GEMM in
    practice (the union over 64 rows is nearly dense) that keeps g, u and h in fp32.
    """
    if rows == 1:
        return 1, 16, 256, False, 4
    if rows <= MAX_SPARSE_ROWS:
        return 16, 16, 256, True, 4
    # The 64 x 64 tiles hold g and u accumulators and the x and w tiles at once: over 4 warps
    # ptxas spilled for sm_90 (5 KB for fp32 CATS, 256 B for bf16), so 8 warps, and for fp32
    # (twice the bytes per tile) half-depth d steps (scripts/triton_aot_check.py).
    return 64, 64, 32 if dtype == torch.float32 else 64, True, 8


@triton.jit
def _rows_dot_weights(x_ptr, w_ptr, r, r_ok, f, f_load, d, x_stride, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr):
    """[BLOCK_R, BLOCK_F] fp32: x[r] · w[f] over d, reading only the weight rows where f_load."""
    # One row (GEMV) keeps a 2-D accumulator and reduces over d once at the end, not per step.
    if USE_DOT:
        acc = tl.zeros((r.shape[0], f.shape[0]), dtype=tl.float32)
    else:
        acc = tl.zeros((f.shape[0], BLOCK_D), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        x = tl.load(x_ptr + r[:, None] * x_stride + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + f[:, None] * d + cols[None, :], mask=f_load[:, None] & c_ok[None, :], other=0.0)
        if USE_DOT:
            # x and w share a dtype: fp16/bf16 products are exact in fp32; fp32 is an IEEE dot.
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += x.to(tl.float32) * w.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[None, :]
    return acc


@triton.jit
def _relu(v):
    # where(v <= 0, 0, v) rather than tl.maximum, which may drop a NaN; torch.relu keeps it.
    return tl.where(v <= 0.0, 0.0, v)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    bg_ptr,
    bu_ptr,
    h_ptr,
    rows,
    d,
    ffn,
    x_stride,
    threshold,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_B_GATE: tl.constexpr,
    HAS_B_UP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    f_ok = f < ffn
    r_ok = r < rows
    g = _rows_dot_weights(x_ptr, wg_ptr, r, r_ok, f, f_ok, d, x_stride, BLOCK_D, USE_DOT)
    if HAS_B_GATE:
        g += tl.load(bg_ptr + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    # Eager Triton passes a Python float as fp32 but Inductor as fp64; compare in fp32 either way,
    # as the reference does (torch rounds a Python scalar to the tensor's dtype).
    threshold = tl.cast(threshold, tl.float32)
    # The gate factor a; a != 0 marks the active neurons. Zeroing where `<=` (not keeping where
    # `>`) keeps a NaN gate, which then counts as active, as in the reference.
    if ACT == _FATRELU:
        a = tl.where(g <= threshold, 0.0, g)
    elif ACT == _RELU2:
        a = _relu(g)
        a = a * a
    elif ACT == _CATS:
        s = tl.div_rn(g, 1.0 + exp(-g))  # as sparse.h's silu: IEEE division, expf
        a = tl.where(tl.abs(s) <= threshold, 0.0, s)
    else:  # _RELU, _DRELU
        a = _relu(g)
    a = tl.where(r_ok[:, None] & f_ok[None, :], a, 0.0)  # padding rows/neurons: never active
    h = a
    if GATED:
        union = tl.max((a != 0.0).to(tl.int32), axis=0) != 0  # [BLOCK_F]
        u = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
        if tl.sum(union.to(tl.int32), axis=0) > 0:
            u = _rows_dot_weights(x_ptr, wu_ptr, r, r_ok, f, union, d, x_stride, BLOCK_D, USE_DOT)
            if HAS_B_UP:
                u += tl.load(bu_ptr + f, mask=union, other=0.0).to(tl.float32)[None, :]
        if ACT == _DRELU:
            u = _relu(u)
        # An inactive neuron gives 0 * u = 0 here (its u is 0: never computed).
        h = a * u
    tl.store(h_ptr + r[:, None] * ffn + f[None, :], h, mask=r_ok[:, None] & f_ok[None, :])


def gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: Optional[torch.Tensor],
    act: int,
    threshold: float,
    b_gate: Optional[torch.Tensor],
    b_up: Optional[torch.Tensor],
) -> torch.Tensor:
    """h [rows, ffn] fp32: the activated FFN intermediate, exactly 0 for inactive neurons."""
    rows, d = x.shape
    ffn = w_gate.shape[0]
    h = torch.empty((rows, ffn), dtype=torch.float32, device=x.device)
    if rows == 0 or ffn == 0:
        return h
    block_r, block_f, block_d, use_dot, num_warps = _tiles(rows, x.dtype)
    block_d = max(16, min(block_d, triton.next_power_of_2(d)))
    grid = (triton.cdiv(ffn, block_f), triton.cdiv(rows, block_r))
    wrap_triton(_gate_up_kernel)[grid](
        x,
        w_gate,
        w_gate if w_up is None else w_up,  # dummy pointers, never read when the flag is off
        w_gate if b_gate is None else b_gate,
        w_gate if b_up is None else b_up,
        h,
        rows,
        d,
        ffn,
        x.stride(0),
        threshold,
        ACT=act,
        GATED=w_up is not None,
        HAS_B_GATE=b_gate is not None,
        HAS_B_UP=b_up is not None,
        BLOCK_R=block_r,
        BLOCK_F=block_f,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
        num_warps=num_warps,
    )
    return h


def relu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: Optional[torch.Tensor],
    w_down_t: torch.Tensor,
    act: int,
    threshold: float,
    b_gate: Optional[torch.Tensor] = None,
    b_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [rows, d] in x's dtype: the FFN with the up and down weights of inactive neurons unread.

    Expects validated inputs: x [rows, d] fp32/fp16/bf16 with a contiguous last dim; w_gate,
    w_up (or None: non-gated) and w_down_t [ffn, d] contiguous of x's dtype; act 0..4 (3 and 4
    gated only); threshold finite >= 0; biases contiguous of x's dtype ([ffn], [ffn], [d]) or None;
    all on one device.
    """
    h = gate_up(x, w_gate, w_up, act, threshold, b_gate, b_up)
    return finalize(splitk_accumulate(h, w_down_t, None), b_down, x.dtype)


def _relu_ffn_op(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: Optional[torch.Tensor],
    w_down_t: torch.Tensor,
    act: int,
    threshold: float,
    b_gate: Optional[torch.Tensor],
    b_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
) -> torch.Tensor:
    return relu_ffn(x, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up, b_down)


def _relu_ffn_fake(x, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up, b_down):
    return x.new_empty(x.shape)


_op = None


def register() -> None:
    """Defines the custom op `actshift::relu_ffn_triton` (idempotent; see kernels/_library.py for
    triton_op vs custom_op). The explicit schema keeps act a plain int (it selects the kernel
    variant) under torch.compile."""
    global _op
    if _op is None:
        _op = define_op(
            "actshift::relu_ffn_triton",
            _relu_ffn_op,
            _relu_ffn_fake,
            kernel=_gate_up_kernel,
            schema=(
                "(Tensor x, Tensor w_gate, Tensor? w_up, Tensor w_down_t, int act, float threshold, "
                "Tensor? b_gate, Tensor? b_up, Tensor? b_down) -> Tensor"
            ),
        )
