"""Triton kernels of the `sparse_linear` op, and its `actshift::sparse_linear_triton` op.

Math (the contract of actshift.reference.sparse_linear): for x [rows, K], weight_t [K, N]
(= linear.weight.t().contiguous()), an fp32 threshold t (one value, or one per input channel [K])
and an optional bias [N],
    xs[r, k] = 0 if |x[r, k]| <= t[k] else x[r, k]           (sparse_threshold: NaN is kept)
    y[r, n]  = sum_k xs[r, k] * weight_t[k, n] + bias[n]       (fp32 sums, one cast to x's dtype)

Design (batch 1..16 decode is memory-bound, so the goal is to read only the needed weight bytes):
- Split-K over weight_t: program (i, j) owns output columns [i*BLOCK_N, (i+1)*BLOCK_N) and the
  input-channel range j; a weight row k is one contiguous run of N values, so skipping an input
  channel skips BLOCK_N contiguous elements per program (whole 32-byte sectors).
- The threshold is fused: each program loads its x block for every row, forms xs and the union
  over rows of the active channels, and loads weight rows only for channels in the union (masked
  loads; an inactive row costs no memory traffic). Each weight tile is loaded once and used for
  all rows (tl.dot for 2..16 rows), so batches cost union-density bytes, not rows x density.
  (TEAL's kernel, which this design follows for batch 1, is wrong for batch > 1.)
- Partial sums are fp32 and go through fp32 atomics into an fp32 workspace, never into the fp16/
  bf16 output (Triton has no bf16 atomic_add, and fp16 atomics round every partial sum); a
  second small kernel adds the bias and casts. A K range with no active channel issues no
  atomics at all.
- Rows are tiled on grid axis 2 (see `_tiles`). The op itself uses a single block (rows <= 16)
  and falls back to a dense cuBLAS/ATen product of the thresholded x for more rows, where the
  union is close to dense (see sparsity.md section 7.3) and a GEMM wins. relu_ffn's down
  projection calls `splitk_accumulate` directly, with 64-row blocks past 16 rows.

The launchers do no validation and no host synchronisation (no data-dependent branch either), so
they run inside `torch.library.triton_op`, under torch.compile(fullgraph=True) and CUDA graphs.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op
from .sparse_threshold import sparse_threshold

# Rows handled by the sparse kernel in one launch; more rows take the dense product. The
# contract's batch limit (union of active inputs across at most 16 rows).
MAX_SPARSE_ROWS = 16

# No union-density fallback on Triton (its crossover density is 1): deciding it needs the union's
# size on the host (a device sync, which breaks CUDA graphs and fullgraph torch.compile), while
# this kernel at full union density reads exactly the bytes of a dense GEMV (plus the x loads and
# fp32 atomics), so the most a density switch could win is that overhead. Not yet measured on a
# GPU (none was available to this branch).

# Threshold modes of the split-K kernel (constexpr, so the branches compile away).
_NONZERO = tl.constexpr(0)  # active iff x != 0 (relu_ffn's h: zero exactly for inactive neurons)
_SCALAR = tl.constexpr(1)  # active iff |x| > t, one t
_PER_CHANNEL = tl.constexpr(2)  # active iff |x| > t[k]

_BLOCK_K = 32


def _tiles(rows: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_R, BLOCK_N, USE_DOT, num_warps) for `rows` rows of x of `dtype`.

    One row: a broadcast-multiply-sum (a GEMV: no padding rows, 16x fewer FLOPs than a dot).
    2..16 rows: one tl.dot tile of 16 rows (its minimum M on tensor cores), all rows sharing each
    weight tile. More rows (only relu_ffn's down projection gets here): 64-row tiles, a dense
    tiled GEMM in practice, since the union of 64 rows' active sets is nearly dense.
    BLOCK_N 256 is 512 bytes of fp16 per weight row and program: whole sectors, coalesced.
    """
    if rows == 1:
        return 1, 256, False, 4
    # fp32 operands (an fp32 x, or relu_ffn's fp32 h) take an FMA dot with twice the register
    # footprint of the half types: at the half-type tiles ptxas spills (255 registers at 16 rows,
    # 6 KB of stack at 64) for sm_90, so they get half-width tiles over 8 warps
    # (scripts/triton_aot_check.py reports no spills for every variant).
    wide = dtype == torch.float32
    if rows <= MAX_SPARSE_ROWS:
        return (16, 128, True, 8) if wide else (16, 256, True, 4)
    return (64, 64, True, 8) if wide else (64, 128, True, 4)


# Aim for about this many programs: a few per SM on an H100 (132 SMs), so the memory system stays
# busy, while each program covers several K blocks and issues fewer atomics.
_TARGET_PROGRAMS = 1024


@triton.jit
def _splitk_kernel(
    x_ptr,
    w_ptr,
    t_ptr,
    ws_ptr,
    rows,
    k_dim,
    n_dim,
    x_stride,
    k_blocks_per_program,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # int64 offsets: k * n_dim exceeds 2**31 for the largest weights.
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(2).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = n < n_dim
    r_ok = r < rows
    k_start = tl.program_id(1).to(tl.int64) * k_blocks_per_program * BLOCK_K
    # One row (GEMV) keeps a 2-D accumulator and reduces over K once at the end, not per block.
    if USE_DOT:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    any_active = tl.full((), 0, tl.int32)
    for i in range(k_blocks_per_program):
        k = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < k_dim
        x = tl.load(x_ptr + r[:, None] * x_stride + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        # Padding lanes hold 0, which is never active (t >= 0).
        if MODE == _NONZERO:
            active = x != 0.0
        else:
            if MODE == _SCALAR:
                t = tl.load(t_ptr)
            else:
                t = tl.load(t_ptr + k, mask=k_ok, other=0.0)[None, :]
            active = ~(tl.abs(x.to(tl.float32)) <= t)  # NaN is active, as in sparse_threshold
        xs = tl.where(active, x, 0.0)
        union = tl.max(active.to(tl.int32), axis=0) != 0  # [BLOCK_K]: some row needs weight row k
        n_union = tl.sum(union.to(tl.int32), axis=0)
        if n_union > 0:
            # The weight rows of inactive channels are masked off: never read from memory.
            w = tl.load(w_ptr + k[:, None] * n_dim + n[None, :], mask=union[:, None] & n_ok[None, :], other=0.0)
            if USE_DOT:
                # Products of fp16/bf16 values are exact in fp32; fp32 (x, or relu_ffn's fp32 h
                # against a fp16/bf16 weight) goes through an IEEE fp32 dot, never tf32.
                acc += tl.dot(xs, w.to(xs.dtype), input_precision="ieee")
            else:
                acc += tl.reshape(xs, (BLOCK_K, 1)).to(tl.float32) * w.to(tl.float32)
            any_active += n_union
    if not USE_DOT:
        acc = tl.sum(acc, axis=0)[None, :]
    if any_active > 0:
        tl.atomic_add(ws_ptr + r[:, None] * n_dim + n[None, :], acc, mask=r_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit
def _finalize_kernel(ws_ptr, bias_ptr, y_ptr, n_dim, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < n_dim
    acc = tl.load(ws_ptr + row * n_dim + n, mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * n_dim + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_accumulate(x: torch.Tensor, weight_t: torch.Tensor, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    """The fp32 product [rows, N] of the thresholded x [rows, K] with weight_t [K, N], reading only
    the weight rows of channels active in some row of each block of rows (all rows up to 16).

    threshold None means "active iff x != 0" (for relu_ffn's fp32 h, whose zeros mark inactive
    neurons); otherwise an fp32 tensor of numel 1 or K. x's last dim and weight_t are contiguous;
    x may be fp32 while weight_t is fp16/bf16 (the products are then formed in fp32).
    """
    rows, k_dim = x.shape
    n_dim = weight_t.shape[1]
    ws = torch.zeros((rows, n_dim), dtype=torch.float32, device=x.device)
    if rows == 0 or k_dim == 0 or n_dim == 0:
        return ws
    block_r, block_n, use_dot, num_warps = _tiles(rows, x.dtype)
    block_n = max(16, min(block_n, triton.next_power_of_2(n_dim)))
    block_k = max(16, min(_BLOCK_K, triton.next_power_of_2(k_dim)))
    n_blocks = triton.cdiv(n_dim, block_n)
    r_blocks = triton.cdiv(rows, block_r)
    k_blocks = triton.cdiv(k_dim, block_k)
    # Spread the K blocks over enough programs to fill the GPU; shapes only, so the choice stays
    # static under torch.compile.
    splits = max(1, min(k_blocks, _TARGET_PROGRAMS // (n_blocks * r_blocks)))
    per_program = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, per_program)
    if threshold is None:
        mode = _NONZERO.value
    else:
        mode = _SCALAR.value if threshold.numel() == 1 else _PER_CHANNEL.value
    wrap_triton(_splitk_kernel)[(n_blocks, splits, r_blocks)](
        x,
        weight_t,
        x if threshold is None else threshold,  # dummy pointer, never read in mode 0
        ws,
        rows,
        k_dim,
        n_dim,
        x.stride(0),
        per_program,
        MODE=mode,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        USE_DOT=use_dot,
        num_warps=num_warps,
    )
    return ws


def finalize(ws: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(ws + bias) cast to `dtype`, ws fp32 [rows, N] contiguous, bias [N] or None."""
    rows, n_dim = ws.shape
    y = torch.empty((rows, n_dim), dtype=dtype, device=ws.device)
    if rows == 0 or n_dim == 0:
        return y
    block_n = min(triton.next_power_of_2(n_dim), 1024)
    wrap_triton(_finalize_kernel)[(rows, triton.cdiv(n_dim, block_n))](
        ws,
        ws if bias is None else bias,  # dummy pointer, never read without a bias
        y,
        n_dim,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        num_warps=max(1, min(4, block_n // 256)),
    )
    return y


def sparse_linear(
    x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = sparse_threshold(x, t) @ weight_t + bias, fp32 sums, in x's dtype.

    Expects validated inputs: x [rows, K] fp32/fp16/bf16 with a contiguous last dim; weight_t
    [K, N] contiguous of x's dtype; threshold fp32 contiguous, numel 1 or K, finite and >= 0; bias
    [N] contiguous of x's dtype or None; all on one device. Rows <= 16 read only the weight rows of
    the union of active inputs; more rows take a dense product of the thresholded x.
    """
    rows = x.shape[0]
    if rows > MAX_SPARSE_ROWS:
        xs = sparse_threshold(x, threshold)
        # Dense fallback: fp32 accumulation inside the GEMM, one rounding to x's dtype.
        return torch.mm(xs, weight_t) if bias is None else torch.addmm(bias, xs, weight_t)
    return finalize(splitk_accumulate(x, weight_t, threshold), bias, x.dtype)


def _sparse_linear_op(
    x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return sparse_linear(x, weight_t, threshold, bias)


def _sparse_linear_fake(x, weight_t, threshold, bias):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


_op = None


def register() -> None:
    """Defines the custom op `actshift::sparse_linear_triton` (idempotent; see kernels/_library.py
    for triton_op vs custom_op)."""
    global _op
    if _op is None:
        _op = define_op(
            "actshift::sparse_linear_triton",
            _sparse_linear_op,
            _sparse_linear_fake,
            kernel=_splitk_kernel,
            schema="(Tensor x, Tensor weight_t, Tensor threshold, Tensor? bias) -> Tensor",
        )
