"""Triton kernels of percentile scaling (ASH, SCALE, ReAct) and AdaSCALE's statistics, and their ops
`actshift::percentile_scale_triton` and `actshift::adascale_stats_triton`.

Math (the contract of csrc/include/actshift/percentile.h and actshift.reference). Per row z [D]
(fp32 math), after the optional clip z = min(z, clip), keeping k elements (1 <= k <= D):
    tau  = the k-th largest value of z
    c_gt = #{z_i > tau},  s_gt = Σ_{z_i > tau} z_i,  s1 = Σ z,  s2 = s_gt + (k - c_gt)·tau
    r    = s1 / s2                                  (s2 is the top-k sum, whatever the ties)
    kept(i) = z_i > tau, or z_i == tau and i is among the first (k - c_gt) such indices
    y per method: 0 ratio: none   1 scale: z·e^r   2 ash_p: kept ? z : 0   3 ash_b: kept ? s1/k : 0
                  4 ash_s: (kept ? z : 0)·e^r   5 react: min(z, clip), and no r
A row holding NaN or Inf (after the clip) gives r = NaN and y = NaN (react excepted: it is only the
clip). AdaSCALE per row, with z̃ the perturbed row and kept_k the mask above for k:
    Q = Σ_{kept_k1} |z − z̃|,   C_o = Σ_{kept_k2} relu(z̃)   (positions not kept are never summed)

Comparisons use the order-preserving uint32 key of the fp32 value (a < b <=> key(a) < key(b)):
bits ^ 0xFFFFFFFF for a set sign bit, bits | 0x80000000 otherwise, with -0.0 first turned into
+0.0 (they tie, and ties go by index), and every NaN (either sign) given the largest key, as
torch.sort orders it, all as in percentile.h: then the kept mask equals reference.topk_mask bit for
bit even for a z holding NaN (which only adascale_stats can show: elsewhere the row is NaN).

Design: one program per row, the whole row in registers (BLOCK_D = next_power_of_2(D), D up to
_MAX_D = 16384). The k-th largest key is found exactly by bisection on its bits, most significant
first: 32 iterations, each keeping the trial bit if #{key >= trial} >= k (one block reduction).
No sort: a bitonic sort of BLOCK_D values takes log2(BLOCK_D)·(log2(BLOCK_D) + 1)/2 exchange
stages that move the data (105 for 16384), while a bisection step only counts, and is exact for any
ties. The tie rank is an inclusive tl.cumsum over the key == tau mask, so the first
(k - c_gt) equal elements in index order are kept, as in every other backend.

The launchers do no validation and no host synchronisation (the caller checks shapes, dtypes, k's
range and devices), so they can run inside `torch.library.triton_op` and be traced by
torch.compile; `register()` defines the ops.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op
from ._math import exp

# Largest supported row: at 16 warps, 16384 values and their keys are 32 + 32 registers per thread,
# and the whole row must stay in registers.
_MAX_D = 16384

# Method codes of percentile.h (constexpr so that the kernel branches compile away).
_RATIO = tl.constexpr(0)
_SCALE = tl.constexpr(1)
_ASH_P = tl.constexpr(2)
_ASH_B = tl.constexpr(3)
_ASH_S = tl.constexpr(4)
_REACT = tl.constexpr(5)


@triton.jit
def _order_key(v):
    """Order-preserving uint32 key of fp32 v, ±0 merged and NaN on top (torch.sort's order)."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.uint32, bitcast=True)
    key = tl.where((bits & 0x80000000) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(v != v, 0xFFFFFFFF, key)


@triton.jit
def _key_value(key):
    """The fp32 value of a (non-NaN) key: the inverse of _order_key."""
    bits = tl.where((key & 0x80000000) != 0, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _top_k(key, k):
    """(kept, t, c_gt): the mask of the k largest keys (ties in index order), the k-th largest key
    t, and #{key > t}. Padding lanes must hold key 0, which no trial reaches (every trial has a set
    bit) and no real value has (the smallest, -inf's, is 0x007FFFFF)."""
    # Bisection on the bits of t: the largest t with #{key >= t} >= k is exactly the k-th largest.
    t = tl.full((), 0, tl.uint32)
    top_bit = tl.full((), 0x80000000, tl.uint32)
    for i in range(32):
        trial = t | (top_bit >> i)
        count = tl.sum((key >= trial).to(tl.int32), axis=0)
        t = tl.where(count >= k, trial, t)
    gt = key > t
    c_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = key == t
    rank = tl.cumsum(eq.to(tl.int32), axis=0)  # 1-based rank among the ties, in index order
    kept = gt | (eq & (rank <= k - c_gt))
    return kept, t, c_gt


@triton.jit
def _percentile_kernel(
    z_ptr,
    k_ptr,
    y_ptr,
    r_ptr,
    d,
    clip,
    METHOD: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * d cannot overflow
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    z = tl.load(z_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLIP:
        # not tl.minimum: a NaN must stay NaN, as in torch.clamp; padding lanes stay 0 (a negative
        # clip would otherwise turn them into `clip` and add them to s1)
        z = tl.where(mask, tl.where(z > clip, clip, z), 0.0)
    if METHOD == _REACT:
        tl.store(y_ptr + row * d + cols, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        k = tl.load(k_ptr + row)
        key = tl.where(mask, _order_key(z), 0)
        kept, t, c_gt = _top_k(key, k)
        # Padding lanes hold z = 0 and key 0: they add nothing to the sums and are never above t.
        s1 = tl.sum(z, axis=0)
        s_gt = tl.sum(tl.where(key > t, z, 0.0), axis=0)
        s2 = s_gt + (k - c_gt).to(tl.float32) * _key_value(t)
        # Checked once per row here rather than by the host (a pass and a sync); NaN fails `<` too.
        finite = tl.sum(tl.where(tl.abs(z) < float("inf"), 0, 1), axis=0) == 0
        r = tl.where(finite, tl.div_rn(s1, s2), float("nan"))
        tl.store(r_ptr + row, r)
        if METHOD != _RATIO:
            # ash_p and ash_s multiply by the mask as the reference does: a dropped element is
            # 0·z (-0.0 for a negative z), and for ash_s NaN when e^r is not finite (s2 = 0 or
            # r > 88), as percentile.h's (kept ? z : 0)·e^r.
            if METHOD == _SCALE:
                y = z * exp(r)
            elif METHOD == _ASH_P:
                y = z * kept.to(tl.float32)
            elif METHOD == _ASH_B:
                y = tl.where(kept, tl.div_rn(s1, k.to(tl.float32)), 0.0)
            else:  # _ASH_S
                y = z * kept.to(tl.float32) * exp(r)
            y = tl.where(finite, y, float("nan"))
            tl.store(y_ptr + row * d + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adascale_stats_kernel(
    z_ptr,
    zp_ptr,
    q_ptr,
    c_ptr,
    d,
    k1,
    k2,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    z = tl.load(z_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    zp = tl.load(zp_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    key = tl.where(mask, _order_key(z), 0)
    kept1, _, _ = _top_k(key, k1)
    kept2, _, _ = _top_k(key, k2)
    # Only kept positions are summed (tl.where, not a product with the mask: NaN · 0 is NaN), as
    # on every backend; relu by tl.where keeps a NaN of z̃ (tl.maximum may drop it).
    q = tl.sum(tl.where(kept1, tl.abs(z - zp), 0.0), axis=0)
    c_o = tl.sum(tl.where(kept2, tl.where(zp < 0.0, 0.0, zp), 0.0), axis=0)
    tl.store(q_ptr + row, q)
    tl.store(c_ptr + row, c_o)


def _launch_config(d: int) -> Tuple[int, int]:
    """(BLOCK_D, num_warps) for a row of d values held whole in registers."""
    assert d <= _MAX_D, f"rows of more than {_MAX_D} values are not supported, got {d}"
    block_d = triton.next_power_of_2(d)
    # One warp per 512 values (16 per thread): the 32 block reductions of the bisection each pay a
    # cross-warp exchange, so fewer, fuller warps suit it better than many sparse ones.
    return block_d, max(1, min(16, block_d // 512))


def _percentile_outputs(z: torch.Tensor, method: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (y, r): y [N, D] of z's dtype ([0, D] for ratio), r fp32 [N] ([0] for react)."""
    n, d = z.shape
    y = z.new_empty((0 if method == _RATIO else n, d))
    r = z.new_empty((0 if method == _REACT else n,), dtype=torch.float32)
    return y, r


def percentile_scale(
    z: torch.Tensor, k: torch.Tensor, method: int, clip: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, r) of percentile scaling of each row of z, keeping k[n] elements of row n.

    Expects validated inputs: z [N, D] contiguous fp32/fp16/bf16 with D <= 16384, k [N] int32 on
    z's device with 1 <= k <= D (unread for react), method in 0..5 (percentile.h's codes), clip
    finite or None (react needs one). y has z's dtype and shape, or is empty [0, D] for ratio; r is
    fp32 [N], or empty [0] for react.
    """
    n, d = z.shape
    y, r = _percentile_outputs(z, method)
    if n == 0 or d == 0:  # nothing to launch (d == 0 only reaches here for react)
        return y, r
    block_d, num_warps = _launch_config(d)
    wrap_triton(_percentile_kernel)[(n,)](
        z,
        k,
        z if method == _RATIO else y,  # dummy pointers, never written for that method
        z if method == _REACT else r,
        d,
        0.0 if clip is None else clip,
        METHOD=method,
        HAS_CLIP=clip is not None,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, r


def adascale_stats(
    z: torch.Tensor, z_perturbed: torch.Tensor, k1: int, k2: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, C_o), fp32 [N]: Σ |z − z̃| over the top-k1 positions of z and Σ relu(z̃) over its top-k2.

    Expects validated inputs: z and z_perturbed [N, D] contiguous, of one dtype (fp32/fp16/bf16),
    D <= 16384, 1 <= k1, k2 <= D.
    """
    n, d = z.shape
    q = z.new_empty((n,), dtype=torch.float32)
    c_o = z.new_empty((n,), dtype=torch.float32)
    if n == 0:
        return q, c_o
    block_d, num_warps = _launch_config(d)
    wrap_triton(_adascale_stats_kernel)[(n,)](
        z, z_perturbed, q, c_o, d, k1, k2, BLOCK_D=block_d, num_warps=num_warps
    )
    return q, c_o


def _percentile_op(
    z: torch.Tensor, k: torch.Tensor, method: int, clip: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    return percentile_scale(z, k, method, clip)


def _adascale_stats_op(
    z: torch.Tensor, z_perturbed: torch.Tensor, k1: int, k2: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    return adascale_stats(z, z_perturbed, k1, k2)


def _percentile_fake(z, k, method, clip):
    return _percentile_outputs(z, method)


def _adascale_stats_fake(z, z_perturbed, k1, k2):
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.float32), z.new_empty((n,), dtype=torch.float32)


_ops = None


def register() -> None:
    """Defines the custom ops `actshift::percentile_scale_triton` and
    `actshift::adascale_stats_triton` (idempotent; see kernels/_library.py for triton_op vs
    custom_op)."""
    global _ops
    if _ops is not None:
        return
    # Explicit schemas: inference would type method, k1 and k2 as SymInt, and method picks the
    # kernel variant, so it must stay a plain int under torch.compile.
    _ops = (
        define_op(
            "actshift::percentile_scale_triton",
            _percentile_op,
            _percentile_fake,
            kernel=_percentile_kernel,
            schema="(Tensor z, Tensor k, int method, float? clip) -> (Tensor, Tensor)",
        ),
        define_op(
            "actshift::adascale_stats_triton",
            _adascale_stats_op,
            _adascale_stats_fake,
            kernel=_percentile_kernel,
            schema="(Tensor z, Tensor z_perturbed, int k1, int k2) -> (Tensor, Tensor)",
        ),
    )
