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
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op

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
    gate_stride,
    slot_stride,
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
        s = tl.load(slot_ptr + row * slot_stride).to(tl.int64)
        valid = (s >= 0) & (s < num_plans)
        # An out-of-range row reads plan 0's scalars (always in bounds) and runs no iteration;
        # its x is stored as is below, so stale slot tables never read out of bounds.
        s = tl.where(valid, s, 0)
        n = tl.where(valid, m, 0)

    scale = tl.load(strength_ptr + s)
    if HAS_GATE:
        scale = scale * tl.load(gate_ptr + row * gate_stride)

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
    weights [S, m], strength [S] (fp32, contiguous), gate [rows] fp32 and slot [rows] int32/int64
    (any stride: an expanded per-row value has stride 0);
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
        0 if gate is None else gate.stride(0),
        0 if slot is None else slot.stride(0),
        vectors.shape[1],
        vectors.shape[0],
        HAS_GATE=gate is not None,
        HAS_SLOT=slot is not None,
        IN_PLACE=in_place,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y


# --- the full steering program (op `actshift::steer_program_triton`) ---------------------------
#
# Math and layout: csrc/include/actshift/steer.h and actshift.reference.steer_program. Per row r with
# plan s = slot[r] (outside [0, S): untouched, monitors 0), all in fp32 on the input row x:
#     mon_i = x·M_i (i < p); ‖x‖; g = gate[r] · condition(x·c or x·c/‖x‖ vs threshold); c = λ·g
#     z = x − Σ_k (x·u_k − t_k) u_k;  z = a ⊙ z + b;  z += Σ_j w_j v_j;  z[idx_q] = mul_q z[idx_q] + add_q
#     y = x + c (z − x), renorm y ← y ‖x‖/‖y‖; c == 0 leaves the row bit-exact.
#
# Grid design: one program per row, the row held whole in registers (BLOCK_D = next pow2 of d, up to
# 16384), so x is read from memory once while every dot product (monitors, condition, the ablation
# coefficients, both norms) is a block reduction over registers; each plan row (M_i, u_k, v_j, a, b)
# is read once per row and served from L2 across rows. A row-wide read-out must finish before any
# element can be written, which is why the additive kernel's column split does not apply here.
# Neuron edits cannot scatter into registers: their positions are gathered as a [BLOCK_N] side vector
# (x, u_k, a, b, v_j at idx, the same fp32 operations in the same order), the dense row is stored
# unedited and the edited elements overwrite it after a barrier; ‖y‖² swaps the unedited squares at
# those positions for the edited ones (O(n), unlike marking idx in the dense row, which needs a
# d-bin histogram or an n × d comparison). Every count is clamped to
# the padded size and indices outside [0, d) are skipped, so bad metadata never reads out of bounds.

# Largest row one program holds (as kernels/percentile.py): 16384 fp32 values are 32 registers per
# thread for each of x and z at 16 warps.
PROGRAM_MAX_D = 16384


@triton.jit
def _program_kernel(
    x_ptr, y_ptr, mon_ptr,
    meta_ptr, scalars_ptr, ablate_ptr, targets_ptr, affine_ptr, vectors_ptr, weights_ptr,
    nidx_ptr, nval_ptr, cond_ptr, monitor_ptr, gate_ptr, slot_ptr, roww_ptr,
    d, x_stride, y_stride, gate_stride, slot_stride, roww_stride, S, K, M, N, P,
    HAS_GATE: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_ROW_W: tl.constexpr,
    HAS_AFFINE: tl.constexpr, HAS_COND: tl.constexpr, HAS_MON: tl.constexpr, IN_PLACE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride cannot overflow
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x_raw = tl.load(x_ptr + row * x_stride + cols, mask=mask)
    x = tl.where(mask, x_raw.to(tl.float32), 0.0)

    s = row * 0
    if HAS_SLOT:
        s = tl.load(slot_ptr + row * slot_stride).to(tl.int64)
    valid = (s >= 0) & (s < S)
    s = tl.where(valid, s, 0)  # plan 0's metadata is always in bounds; its counts are zeroed below
    meta = meta_ptr + s * 5
    flags = tl.load(meta)
    p = tl.where(valid, tl.minimum(tl.load(meta + 4), P), 0)

    # Read-outs on the input row.
    pcols = tl.arange(0, BLOCK_P)
    mon = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for i in range(p):
        mi = tl.load(monitor_ptr + (s * P + i) * d + cols, mask=mask, other=0.0)
        mon = tl.where(pcols == i, tl.sum(x * mi, axis=0), mon)
    if HAS_MON:  # without monitors mon_ptr is a dummy: no store at all, so nothing looks mutated
        tl.store(mon_ptr + row * P + pcols, mon, mask=pcols < P)
    x_sq = tl.sum(x * x, axis=0)
    g = tl.full((), 1.0, tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + row * gate_stride)
    if HAS_COND:
        if (flags & 2) != 0:
            dot = tl.sum(x * tl.load(cond_ptr + s * d + cols, mask=mask, other=0.0), axis=0)
            norm = tl.sqrt_rn(x_sq)
            score = dot
            if (flags & 4) != 0:
                score = tl.where(norm > 0.0, tl.div_rn(dot, tl.where(norm > 0.0, norm, 1.0)), 0.0)
            thr = tl.load(scalars_ptr + s * 2 + 1)
            holds = tl.where((flags & 8) != 0, score < thr, score > thr)
            g = g * tl.where(holds, 1.0, 0.0)
    c = tl.load(scalars_ptr + s * 2) * g
    steered = valid & (c != 0.0)

    # The program, skipped entirely (counts 0, no plan rows read) for rows that stay as they are.
    k = tl.where(steered, tl.minimum(tl.load(meta + 1), K), 0)
    m = tl.where(steered, tl.minimum(tl.load(meta + 2), M), 0)
    n = tl.where(steered, tl.minimum(tl.load(meta + 3), N), 0)
    ncols = tl.arange(0, BLOCK_N)
    nmask = ncols < n
    idx = tl.load(nidx_ptr + s * N + ncols, mask=nmask, other=0)
    nmask = nmask & (idx >= 0) & (idx < d)
    xn = tl.load(x_ptr + row * x_stride + idx, mask=nmask, other=0.0).to(tl.float32)
    z = x
    zn = xn
    for q in range(k):
        u_ptr = ablate_ptr + (s * K + q) * d
        u = tl.load(u_ptr + cols, mask=mask, other=0.0)
        coef = tl.sum(x * u, axis=0) - tl.load(targets_ptr + s * K + q)
        z -= coef * u
        zn -= coef * tl.load(u_ptr + idx, mask=nmask, other=0.0)
    if HAS_AFFINE:
        if (flags & 1) != 0:
            a_ptr = affine_ptr + s * 2 * d
            z = tl.load(a_ptr + cols, mask=mask, other=0.0) * z + tl.load(a_ptr + d + cols, mask=mask, other=0.0)
            zn = tl.load(a_ptr + idx, mask=nmask, other=0.0) * zn + tl.load(a_ptr + d + idx, mask=nmask, other=0.0)
    w_ptr = weights_ptr + s * M
    if HAS_ROW_W:
        w_ptr = roww_ptr + row * roww_stride
    for j in range(m):
        wj = tl.load(w_ptr + j)
        v_ptr = vectors_ptr + (s * M + j) * d
        z += wj * tl.load(v_ptr + cols, mask=mask, other=0.0)
        zn += wj * tl.load(v_ptr + idx, mask=nmask, other=0.0)
    y = x + c * (z - x)
    yd = tl.where(nmask, xn + c * (zn - xn), 0.0)  # the unedited y at idx, as the dense row holds it
    zn = tl.load(nval_ptr + s * 2 * N + ncols, mask=nmask, other=1.0) * zn + tl.load(
        nval_ptr + (s * 2 + 1) * N + ncols, mask=nmask, other=0.0)
    yn = tl.where(nmask, xn + c * (zn - xn), 0.0)
    f = tl.full((), 1.0, tl.float32)
    if (flags & 16) != 0:
        y_sq = tl.sum(y * y, axis=0) - tl.sum(yd * yd, axis=0) + tl.sum(yn * yn, axis=0)
        f = tl.where(y_sq > 0.0, tl.div_rn(tl.sqrt_rn(x_sq), tl.sqrt_rn(tl.where(y_sq > 0.0, y_sq, 1.0))), 1.0)
    # Untouched rows store x itself (bit-exact, NaN payloads too), or in place are not written.
    out = tl.where(steered, (y * f).to(x_raw.dtype), x_raw)
    store = mask
    if IN_PLACE:
        store = store & (cols < tl.where(steered, d, 0))
    tl.store(y_ptr + row * y_stride + cols, out, mask=store)
    # Every thread's dense store lands before the edited elements overwrite theirs.
    tl.debug_barrier()
    tl.store(y_ptr + row * y_stride + idx, (yn * f).to(x_raw.dtype), mask=nmask)


def program_config(d: int) -> Tuple[int, int]:
    """(BLOCK_D, num_warps) of the program kernel for rows of d values."""
    block_d = triton.next_power_of_2(d)
    # One warp per 256 values (8 per thread), up to 16 warps. At 16 values per thread (one warp
    # per 512) ptxas held x, z and the plan rows in 128 registers by spilling at d = 4096
    # (scripts/triton_aot_check.py, sm_90). d = 16384 still spills at 16 warps.
    return block_d, max(1, min(16, block_d // 256))


def steer_program(
    x: torch.Tensor,
    meta: torch.Tensor,
    scalars: torch.Tensor,
    ablate: torch.Tensor,
    targets: torch.Tensor,
    affine: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    neuron_idx: torch.Tensor,
    neuron_val: torch.Tensor,
    condition: torch.Tensor,
    monitor: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    slot: Optional[torch.Tensor] = None,
    row_weights: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, monitors) of the full steering program per row; y is written to `out` or a new tensor.

    Expects the validated bank of SteeringBank.program (layout: csrc/torch_bindings.cpp) on x's
    device, x [rows, d] with a contiguous last dim and d <= PROGRAM_MAX_D, gate [rows] fp32, slot
    [rows] int32/int64 and row_weights [rows, M] fp32 (each row contiguous), all three of any row
    stride; out like x, either x itself (`in_place`, decided
    by the caller) or not overlapping it. No host synchronisation, so torch.compile can trace it.
    """
    rows, d = x.shape
    P = monitor.shape[1]
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device) if out is None else out
    if rows == 0 or d == 0:  # nothing to launch; an empty row projects to 0 and stays as it is
        return y, x.new_zeros((rows, P), dtype=torch.float32)
    if d > PROGRAM_MAX_D:
        raise ValueError(f"x has hidden size {d}; the triton steering program holds a row in one "
                         f"program, up to {PROGRAM_MAX_D} (use backend='cuda' or 'cpu')")
    mon = x.new_empty((rows, P), dtype=torch.float32)

    def some(t: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
        # Empty parts of the bank (static sizes) pass a dummy pointer of the same dtype: every access
        # to them is masked off.
        return t if t.numel() > 0 else dummy

    f32, i32 = scalars, meta
    block_d, num_warps = program_config(d)
    wrap_triton(_program_kernel)[(rows,)](
        x, y, mon if P > 0 else x,
        meta, scalars, some(ablate, f32), some(targets, f32), some(affine, f32), some(vectors, f32),
        some(weights, f32), some(neuron_idx, i32), some(neuron_val, f32), some(condition, f32),
        some(monitor, f32),
        x if gate is None else gate,  # dummy pointers, never read when the flag is off
        x if slot is None else slot,
        x if row_weights is None else row_weights,
        d, x.stride(0), y.stride(0),
        0 if gate is None else gate.stride(0),
        0 if slot is None else slot.stride(0),
        0 if row_weights is None else row_weights.stride(0),
        meta.shape[0], ablate.shape[1], vectors.shape[1],
        neuron_idx.shape[1], P,
        HAS_GATE=gate is not None,
        HAS_SLOT=slot is not None,
        HAS_ROW_W=row_weights is not None,
        HAS_AFFINE=affine.shape[1] == 2,
        HAS_COND=condition.shape[1] == 1,
        HAS_MON=P > 0,
        IN_PLACE=in_place,
        BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(max(neuron_idx.shape[1], 1)),
        BLOCK_P=triton.next_power_of_2(max(P, 1)),
        num_warps=num_warps,
    )
    return y, mon


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


def _program_op(
    x: torch.Tensor, meta: torch.Tensor, scalars: torch.Tensor, ablate: torch.Tensor,
    targets: torch.Tensor, affine: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
    neuron_idx: torch.Tensor, neuron_val: torch.Tensor, condition: torch.Tensor, monitor: torch.Tensor,
    gate: Optional[torch.Tensor], slot: Optional[torch.Tensor], row_weights: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return steer_program(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx,
                         neuron_val, condition, monitor, gate, slot, row_weights)


def _program_out_op(
    x: torch.Tensor, meta: torch.Tensor, scalars: torch.Tensor, ablate: torch.Tensor,
    targets: torch.Tensor, affine: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
    neuron_idx: torch.Tensor, neuron_val: torch.Tensor, condition: torch.Tensor, monitor: torch.Tensor,
    gate: Optional[torch.Tensor], slot: Optional[torch.Tensor], row_weights: Optional[torch.Tensor],
    out: torch.Tensor, in_place: bool,
) -> torch.Tensor:
    return steer_program(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx,
                         neuron_val, condition, monitor, gate, slot, row_weights, out, in_place)[1]


def _program_fake(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx, neuron_val,
                  condition, monitor, gate, slot, row_weights):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], monitor.shape[1]), dtype=torch.float32)


def _program_out_fake(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx,
                      neuron_val, condition, monitor, gate, slot, row_weights, out, in_place):
    return x.new_empty((x.shape[0], monitor.shape[1]), dtype=torch.float32)


_ops = None


def register() -> None:
    """Defines the custom ops `actshift::steer_triton`, `actshift::steer_triton_out`,
    `actshift::steer_program_triton` and `actshift::steer_program_triton_out` (idempotent;
    see kernels/_library.py for triton_op vs custom_op)."""
    global _ops
    if _ops is not None:
        return
    _ops = (
        define_op("actshift::steer_triton", _steer_op, _steer_fake, kernel=_steer_kernel),
        define_op("actshift::steer_triton_out", _steer_out_op, _steer_out_fake, kernel=_steer_kernel,
                  mutates_args={"out"}),
        define_op("actshift::steer_program_triton", _program_op, _program_fake, kernel=_steer_kernel),
        define_op("actshift::steer_program_triton_out", _program_out_op, _program_out_fake,
                  kernel=_steer_kernel, mutates_args={"out"}),
    )
