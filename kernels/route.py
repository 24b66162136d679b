"""Triton kernel of the `route` op (MoE routing with per-row expert edits), and its
`actshift::route_triton` op.

Math: the contract of actshift.reference.route (and csrc/include/actshift/route.h). Per row, with
z = logits + offsets[slot] (offsets already scaled by the plan's strength; one add):
    softmax: score = softmax(z) over experts not off, key = z
    sigmoid: score = sigmoid(z), key = score + bias; group-limited eligibility
    k picks by (tier, key, -index) descending: 2 forced on, 1 eligible, 0 live outside the chosen
    groups, off experts never; weights = score of the picks, renormalised, times scale.

Grid design: one program per row holding the whole router row (BLOCK_E = next power of two of E,
E <= a few hundred) in registers; each pick is three reductions (best tier, best key among it,
lowest index among those), so a row costs O(k) reductions instead of a sort. Groups (at most 32)
are scored in a loop of masked reductions. The launcher does no validation and no host sync.
"""
from typing import Optional  # torch.library.triton_op infers the schema from these annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import define_op


@triton.jit
def _route_kernel(
    logits_ptr, stride, offsets_ptr, modes_ptr, S, slot_ptr, bias_ptr, idx_ptr, w_ptr,
    E, k, n_group, topk_group, scale,
    HAS_BANK: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
    RENORM: tl.constexpr, GROUPED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    z = tl.load(logits_ptr + row * stride + e, mask=valid, other=0.0).to(tl.float32)
    mode = tl.zeros([BLOCK_E], dtype=tl.int32)
    if HAS_BANK:
        if HAS_SLOT:
            s = tl.load(slot_ptr + row).to(tl.int64)
        else:
            s = tl.full([], 0, tl.int64)
        edited = (s >= 0) & (s < S)
        s = tl.where(edited, s, 0)
        off = tl.load(offsets_ptr + s * E + e, mask=valid, other=0.0)  # s clamped to a real plan
        z = tl.where(edited, z + off, z)
        mode = tl.load(modes_ptr + s * E + e, mask=valid, other=0).to(tl.int32)
        mode = tl.where(edited, mode, 0)
    # tier: 2 forced on, 1 eligible, 0 outside the chosen groups, -1 off, -2 padding / taken
    tier = tl.where(mode == 2, 2, tl.where(mode == 1, -1, 1))
    tier = tl.where(valid, tier, -2)
    live = tier >= 0
    if SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-z))
        key = score
        if HAS_BIAS:
            key = score + tl.load(bias_ptr + e, mask=valid, other=0.0)
        if GROUPED:
            G = E // n_group
            grp = e // G
            gid = tl.arange(0, BLOCK_G)
            gscore = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for g in range(0, n_group):
                in_g = live & (grp == g)
                b1 = tl.max(tl.where(in_g, key, float("-inf")), axis=0)
                i1 = tl.min(tl.where(in_g & (key == b1), e, BLOCK_E), axis=0)
                b2 = tl.max(tl.where(in_g & (e != i1), key, float("-inf")), axis=0)
                total = tl.where(G >= 2, b1 + b2, b1)
                gscore = tl.where(gid == g, total, gscore)
            # rank groups: larger score first, then lower index; keep the first topk_group
            chosen = tl.zeros([BLOCK_G], dtype=tl.int32)
            avail = gid < n_group
            for _ in range(0, topk_group):
                best = tl.max(tl.where(avail, gscore, float("-inf")), axis=0)
                first = tl.min(tl.where(avail & (gscore == best), gid, BLOCK_G), axis=0)
                chosen = tl.where(gid == first, 1, chosen)
                avail = avail & (gid != first)
            eligible = tl.zeros([BLOCK_E], dtype=tl.int32)
            for g in range(0, n_group):
                c = tl.sum(tl.where(gid == g, chosen, 0), axis=0)
                eligible = tl.where(grp == g, c, eligible)
            tier = tl.where((tier == 1) & (eligible == 0), 0, tier)
    else:
        m = tl.max(tl.where(live, z, float("-inf")), axis=0)
        p = tl.where(live, tl.exp(z - m), 0.0)
        score = p / tl.sum(p, axis=0)
        key = z
    kk = tl.arange(0, BLOCK_K)
    out_i = tl.zeros([BLOCK_K], dtype=tl.int64)
    out_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in range(0, k):
        t = tl.max(tier, axis=0)
        cand = tier == t
        best = tl.max(tl.where(cand, key, float("-inf")), axis=0)
        pick = tl.min(tl.where(cand & (key == best), e, BLOCK_E), axis=0)
        w = tl.sum(tl.where(e == pick, score, 0.0), axis=0)
        out_i = tl.where(kk == j, pick.to(tl.int64), out_i)
        out_w = tl.where(kk == j, w, out_w)
        tier = tl.where(e == pick, -2, tier)
    if RENORM:
        total = tl.sum(out_w, axis=0)
        if SIGMOID:
            total = total + 1e-20
        out_w = out_w / total
    out_w = out_w * scale
    kmask = kk < k
    tl.store(idx_ptr + row * k + kk, out_i, mask=kmask)
    tl.store(w_ptr + row * k + kk, out_w, mask=kmask)


def route(logits: torch.Tensor, k: int, offsets: Optional[torch.Tensor], modes: Optional[torch.Tensor],
          slot: Optional[torch.Tensor], bias: Optional[torch.Tensor], kind: int, renorm: bool, n_group: int,
          topk_group: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [rows, k] int64, weights [rows, k] fp32). Expects validated inputs (the wrapper
    actshift.route checks them): logits [rows, E] with a contiguous last dim; offsets [S, E] fp32
    and modes [S, E] int8 together or neither; slot [rows] int32/int64 or None; bias [E] fp32 or
    None; kind 0 softmax / 1 sigmoid; n_group <= 32 dividing E."""
    rows, E = logits.shape
    idx = torch.empty((rows, k), dtype=torch.long, device=logits.device)
    w = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return idx, w
    has_bank = offsets is not None and offsets.shape[0] > 0
    block_e = triton.next_power_of_2(E)
    wrap_triton(_route_kernel)[(rows,)](
        logits, logits.stride(0), offsets if has_bank else w, modes if has_bank else idx,
        offsets.shape[0] if has_bank else 0, slot if slot is not None else idx,
        bias if bias is not None else w, idx, w, E, k, n_group, topk_group, float(scale),
        HAS_BANK=has_bank, HAS_SLOT=slot is not None, HAS_BIAS=bias is not None, SIGMOID=kind == 1,
        RENORM=bool(renorm), GROUPED=kind == 1 and topk_group < n_group, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_G=triton.next_power_of_2(n_group),
        num_warps=1 if block_e <= 256 else 4,
    )
    return idx, w


def _route_fake(logits, k, offsets, modes, slot, bias, kind, renorm, n_group, topk_group, scale):
    rows = logits.shape[0]
    return (logits.new_empty((rows, k), dtype=torch.long), logits.new_empty((rows, k), dtype=torch.float32))


_op = None


def register() -> None:
    """Defines the custom op `actshift::route_triton` (idempotent; see kernels/_library.py)."""
    global _op
    if _op is None:
        _op = define_op(
            "actshift::route_triton",
            route,
            _route_fake,
            kernel=_route_kernel,
            schema="(Tensor logits, int k, Tensor? offsets, Tensor? modes, Tensor? slot, Tensor? bias, "
                   "int kind, bool renorm, int n_group, int topk_group, float scale) -> (Tensor, Tensor)",
        )
