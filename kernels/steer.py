"""Triton kernel of the `steer` op (additive steering of rows), and its `actshift::steer_triton` op.

Math (the contract of csrc/include/actshift/steer.h and actshift.reference.steer). Per row r of
x [rows, d], with a bank of S plans (vectors [S, m, d], weights [S, m], strength [S], all fp32):
    s = slot[r] if slot is given else 0       (s < 0 or s >= S: the row is copied unchanged)
    g = gate[r] if gate is given else 1
    c_j = (strength[s] * g) * weights[s, j]
    y[r, i] = x[r, i] + sum_j c_j * vectors[s, j, i]    (fp32, j ascending, then cast to x's dtype)

Grid design: one program per (row, block of BLOCK_D columns), rows on grid axis 0 (up to 2**31 - 1
rows) and column blocks on axis 1 (at most 65535, plenty for any hidden size). Splitting a row over
several programs matters at decode, where there are only 1..8 rows: one program per row would leave
almost the whole GPU idle. Each program reads its slice of x once, then the matching slice of each
of the m vectors of the row's plan, keeping the sum in fp32 registers.

The launcher `steer` does no validation and no host synchronisation (the caller checks shapes,
dtypes and devices), so it can run inside `torch.library.triton_op` and be traced by torch.compile;
`register()` defines that op.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Largest column block. 512 columns with 4 warps is 4 elements per thread (one 16-byte fp32 load
# per vector), and a hidden size of 4096..8192 splits into 8..16 programs per row, so a decode
# batch of 1..8 rows launches 8..128 programs instead of 1..8. Larger prefill batches have rows
# enough to fill the GPU with any block size. Depending on d only (not on rows) keeps the choice
# static under torch.compile with a dynamic batch size.
_MAX_BLOCK_D = 512


@triton.jit
def _steer_kernel(
    x_ptr,
    y_ptr,
    vectors_ptr,
    weights_ptr,
    strength_ptr,
    gate_ptr,
    slot_ptr,
    d,
    x_stride,
    y_stride,
    m,
    num_plans,
    HAS_GATE: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    IN_PLACE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 so that row * stride cannot overflow on large activations.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d  # the last block of a row whose d is not a multiple of BLOCK_D
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask)

    s = 0
    n = m
    if HAS_SLOT:
        s = tl.load(slot_ptr + row).to(tl.int64)
        valid = (s >= 0) & (s < num_plans)
        # An out-of-range row reads plan 0's scalars (always in bounds) and runs no iteration;
        # its x is stored as is below, so stale slot tables never read out of bounds.
        s = tl.where(valid, s, 0)
        n = tl.where(valid, m, 0)

    scale = tl.load(strength_ptr + s)
    if HAS_GATE:
        scale = scale * tl.load(gate_ptr + row)

    acc = x.to(tl.float32)
    w_ptr = weights_ptr + s * m
    v_ptr = vectors_ptr + s * m * d + cols
    # Runtime loop: m (0..16) varies between plan banks without recompiling the kernel; j ascends as
    # the contract requires, so every backend sums in the same order.
    for j in range(n):
        c = scale * tl.load(w_ptr + j)
        acc += c * tl.load(v_ptr, mask=mask, other=0.0)
        v_ptr += d

    y = acc.to(x.dtype)
    if HAS_SLOT:
        # Storing x itself (not its fp32 round trip) keeps skipped rows bit-exact, NaN payloads too;
        # in place, a skipped row already holds its output and is not written at all.
        y = tl.where(valid, y, x)
        if IN_PLACE:
            mask = cols < tl.where(valid, d, 0)
    tl.store(y_ptr + row * y_stride + cols, y, mask=mask)


def steer(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    in_place: bool = False,
) -> torch.Tensor:
    """y = x + λ_s · g · Σ_j w_{s,j} v_{s,j} per row, written to `out` or a new contiguous tensor.

    Expects validated inputs: x [rows, d] with a contiguous last dim, vectors [S, m, d],
    weights [S, m], strength [S], gate [rows] (all fp32 and contiguous), slot [rows] int32/int64;
    out [rows, d] of x's dtype with a contiguous last dim, either x itself or not overlapping it
    (each program reads its slice of x before writing the same slice of out). `in_place` says out
    is x (decided by the caller: data pointers are not readable while torch.compile traces), so
    untouched rows need no write.
    """
    rows, d = x.shape
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device) if out is None else out
    if rows == 0 or d == 0:  # nothing to launch (d == 0 would also give an empty column block)
        return y
    block_d = min(triton.next_power_of_2(d), _MAX_BLOCK_D)
    # One warp per 128 columns: 4 elements per thread, and fewer idle lanes for small d.
    num_warps = max(1, min(4, block_d // 128))
    grid = (rows, triton.cdiv(d, block_d))
    wrap_triton(_steer_kernel)[grid](
        x,
        y,
        vectors,
        weights,
        strength,
        x if gate is None else gate,  # dummy pointer, never read when the flag is off
        x if slot is None else slot,
        d,
        x.stride(0),
        y.stride(0),
        vectors.shape[1],
        vectors.shape[0],
        HAS_GATE=gate is not None,
        HAS_SLOT=slot is not None,
        IN_PLACE=in_place,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y


def _steer_op(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    gate: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
) -> torch.Tensor:
    return steer(x, vectors, weights, strength, gate, slot)


def _steer_out_op(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    gate: Optional[torch.Tensor],
    slot: Optional[torch.Tensor],
    out: torch.Tensor,
    in_place: bool,
) -> None:
    steer(x, vectors, weights, strength, gate, slot, out, in_place)


def _steer_fake(x, vectors, weights, strength, gate, slot):
    return x.new_empty(x.shape)


def _steer_out_fake(x, vectors, weights, strength, gate, slot, out, in_place):
    return None


_ops = None


def register() -> None:
    """Defines the custom ops `actshift::steer_triton` and `actshift::steer_triton_out` (idempotent).

    A triton_op rather than an opaque custom_op, so that torch.compile sees the kernel launch.
    Under TRITON_INTERPRET=1, @triton.jit yields an interpreted function that wrap_triton passes
    through untraced, so tracing would run the kernel on data-less FakeTensors; there the op is an
    opaque custom_op with a shape-only fake, which keeps opcheck and torch.compile usable on CPU.
    """
    global _ops
    if _ops is not None:
        return
    if isinstance(_steer_kernel, triton.runtime.JITFunction):
        _ops = (
            torch.library.triton_op("actshift::steer_triton", _steer_op, mutates_args=()),
            torch.library.triton_op("actshift::steer_triton_out", _steer_out_op, mutates_args={"out"}),
        )
    else:
        _ops = (
            torch.library.custom_op("actshift::steer_triton", _steer_op, mutates_args=()),
            torch.library.custom_op("actshift::steer_triton_out", _steer_out_op, mutates_args={"out"}),
        )
        _ops[0].register_fake(_steer_fake)
        _ops[1].register_fake(_steer_out_fake)
