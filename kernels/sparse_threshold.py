"""Triton kernel of the `sparse_threshold` op, and its `actshift::sparse_threshold_triton` op.

Math (the contract of actshift.reference.sparse_threshold): for x [rows, n] and an fp32 threshold t
holding one value (scalar) or one per channel [n],
    y[r, i] = 0 if |x[r, i]| <= t[i] else x[r, i]
i.e. x is kept where |x| > t strictly, and a NaN is kept (|NaN| <= t is false), so it propagates.

Grid design: one program per (row, block of BLOCK_N columns), as kernels/steer.py: rows on grid
axis 0 and column blocks on axis 1, so a decode batch of a few rows still spreads over many
programs. Purely elementwise and memory-bound: one load and one store per element.

The launcher does no validation and no host synchronisation (the caller checks shapes, dtypes,
devices and that t is finite and >= 0), so it can run inside `torch.library.triton_op`.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op

# 1024 columns with 4 warps: 8 elements (16-32 bytes) per thread per program.
_MAX_BLOCK_N = 1024


@triton.jit
def _sparse_threshold_kernel(
    x_ptr,
    t_ptr,
    y_ptr,
    n,
    x_stride,
    PER_CHANNEL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride cannot overflow
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask)
    if PER_CHANNEL:
        t = tl.load(t_ptr + cols, mask=mask)
    else:
        t = tl.load(t_ptr)
    # `<=` (not `where(|x| > t, x, 0)`) so that NaN is kept, as the contract says.
    y = tl.where(tl.abs(x.to(tl.float32)) <= t, 0.0, x)
    tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def sparse_threshold(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """y = x where |x| > t else 0, as a new contiguous tensor of x's shape and dtype.

    Expects validated inputs: x [rows, n] fp32/fp16/bf16 with a contiguous last dim; threshold fp32
    contiguous on x's device with numel 1 (one threshold) or n (per channel), finite and >= 0.
    """
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y
    block_n = min(triton.next_power_of_2(n), _MAX_BLOCK_N)
    num_warps = max(1, min(4, block_n // 256))
    grid = (rows, triton.cdiv(n, block_n))
    wrap_triton(_sparse_threshold_kernel)[grid](
        x,
        threshold,
        y,
        n,
        x.stride(0),
        # numel 1 with n == 1 reads t[0] either way
        PER_CHANNEL=threshold.numel() != 1,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


def _sparse_threshold_op(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return sparse_threshold(x, threshold)


def _sparse_threshold_fake(x, threshold):
    return x.new_empty(x.shape)


_op = None


def register() -> None:
    """Defines the custom op `actshift::sparse_threshold_triton` (idempotent; see
    kernels/_library.py for triton_op vs custom_op)."""
    global _op
    if _op is None:
        _op = define_op(
            "actshift::sparse_threshold_triton",
            _sparse_threshold_op,
            _sparse_threshold_fake,
            kernel=_sparse_threshold_kernel,
            schema="(Tensor x, Tensor threshold) -> Tensor",
        )
