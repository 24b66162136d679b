"""The `route` op: MoE routing with per-row expert edits. Public wrapper, checks, dispatch, fake.

Backends: "cpu" and "cuda" call torch.ops.actshift.route (C++); "triton" calls
torch.ops.actshift.route_triton (kernels/route.py); "reference" is reference.route.
"""
from __future__ import annotations

import numbers

import torch

from .. import _ext, backends, reference
from ..experts.plan import ExpertBank, ExpertPlan, as_expert_bank
from . import _autograd
from ._sparse import FLOAT_DTYPES, register_triton_early, triton_op

# The routing of each architecture family (integrations/architectures.py names them per model).
KINDS = {"softmax_topk": reference.ROUTE_SOFTMAX, "sigmoid_group_topk": reference.ROUTE_SIGMOID}
MAX_GROUPS = 32  # csrc/include/actshift/route.h


def _route_fake(logits, k, offsets, modes, slot, bias, kind, renorm, n_group, topk_group, scale):
    torch._check(logits.dim() == 2, lambda: "route: logits must be [rows, E]")
    rows = logits.shape[0]
    return (logits.new_empty((rows, k), dtype=torch.long), logits.new_empty((rows, k), dtype=torch.float32))


if _ext.EXT_LOADED and hasattr(torch.ops.actshift, "route"):
    torch.library.register_fake("actshift::route")(_route_fake)
    _autograd.register("route")

register_triton_early("route")


def route(
    logits: torch.Tensor,
    k: int,
    plan: ExpertPlan | ExpertBank | list[ExpertPlan] | None = None,
    *,
    slot: torch.Tensor | None = None,
    kind: str = "softmax_topk",
    renorm: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes each row of router logits to k experts, after that row's expert plan.

    Semantics (fixed by actshift.reference.route): logits + strength * offsets; experts switched
    off are never picked and stay out of the softmax normaliser; experts forced on are always
    picked, first, taking the places of the lowest-scoring picks; equal keys pick the lowest
    index. Picks are returned in rank order.

    Args:
        logits: [..., E] router logits, fp32/fp16/bf16 (computed in fp32).
        k: experts per row.
        plan: an ExpertPlan (every row), an ExpertBank or list of plans (one per `slot`), or None.
        slot: int32/int64 [...] (logits' leading shape) choosing each row's plan from the bank;
            -1 leaves a row unedited; None: plan 0.
        kind: "softmax_topk" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid_group_topk" (DeepSeek-V3:
            sigmoid scores, `bias` added for the choice only, group-limited top-k).
        renorm: divide the picked weights by their sum (Mixtral always; Qwen/OLMoE `norm_topk_prob`).
        bias: fp32 [E] correction bias (sigmoid only).
        n_group, topk_group: experts split into n_group groups (<= 32), picks from the best
            topk_group groups (sigmoid only; a group scores the sum of its two best keys).
        scale: multiplies the weights (DeepSeek-V3 `routed_scaling_factor`).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        (indices [..., k] int64, weights [..., k] fp32).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dim (the experts)")
    E = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}] (the number of experts), got {k!r}")
    code = KINDS.get(kind)
    if code is None:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if code == reference.ROUTE_SIGMOID:
        if isinstance(n_group, bool) or not isinstance(n_group, int) or not 1 <= n_group <= MAX_GROUPS or E % n_group:
            raise ValueError(f"n_group must be an int in [1, {MAX_GROUPS}] dividing E={E}, got {n_group!r}")
        if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
    elif bias is not None or n_group != 1 or topk_group != 1:
        raise ValueError("bias, n_group and topk_group apply to kind='sigmoid_group_topk' only")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (E,):
            raise ValueError(f"bias must be a tensor [{E}], got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device} but logits are on {logits.device}")
        bias = bias.float().contiguous()
    x = logits.reshape(-1, E)
    if x.stride(-1) != 1:  # (also a size-1 or empty view, which .contiguous() leaves as it is)
        x = x.new_empty(x.shape).copy_(x)
    offsets = modes = None
    if plan is not None:
        bank = as_expert_bank(plan)
        if bank.num_experts != E:
            raise ValueError(f"plan has {bank.num_experts} experts but logits have E={E}")
        bank.check_k(k)
        offsets, modes = bank.tensors(x.device)
    if slot is not None:
        if not isinstance(slot, torch.Tensor) or slot.dtype not in (torch.int32, torch.int64):
            raise TypeError("slot must be an int32 or int64 tensor")
        if tuple(slot.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"slot must have logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(slot.shape)}")
        if slot.device != x.device:
            raise ValueError(f"slot is on {slot.device} but logits are on {x.device}")
        slot = slot.reshape(-1).contiguous()
        if plan is not None and slot.numel() and not torch.compiler.is_compiling() and not (
                slot.is_cuda and torch.cuda.is_current_stream_capturing()) and slot.device.type == "cpu":
            low, top = int(slot.min()), int(slot.max())
            if low < -1 or top >= len(bank):
                raise ValueError(f"slot holds {low if low < -1 else top}, out of range for a bank of {len(bank)} "
                                 "plan(s) (-1 leaves a row unedited)")
    name = backends.resolve(backend, x.device)
    args = (x, int(k), offsets, modes, slot, bias, code, bool(renorm), int(n_group), int(topk_group), float(scale))
    if name == "reference":
        idx, w = reference.route(*args)
    elif name == "triton":
        idx, w = _autograd.call(triton_op("route"), *args)
    else:
        idx, w = _autograd.call(torch.ops.actshift.route, *args)
    lead = logits.shape[:-1]
    return idx.view(*lead, k), w.view(*lead, k)
