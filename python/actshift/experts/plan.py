"""Expert plans: how one MoE layer's router is edited for a request, validated once.

An `ExpertPlan` holds, for a router over E experts, an additive logit offset vector [E] with a
strength, a set of experts switched off and a set forced on. Plans stack into an `ExpertBank` (the
op's offsets [S, E] = strength * offsets and modes [S, E] int8), so one batch can route each row
with its own plan (`slot`), as `SteeringBank` does for steering.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

from ..reference import EXPERT_FREE, EXPERT_OFF, EXPERT_ON


def _indices(value, name: str, num_experts: int) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype == torch.bool or value.dim() > 1:
            raise TypeError(f"{name} must be expert indices (ints), got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an expert index or a sequence of them, got {type(value).__name__}")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {i!r}")
        if not 0 <= i < num_experts:
            raise ValueError(f"{name} holds expert {i}, out of range for {num_experts} experts")
        out.append(int(i))
    return tuple(sorted(set(out)))


class ExpertPlan:
    """One router edit: logits + strength * offsets, experts `off` never selected (and outside the
    softmax normaliser), experts `on` always selected (replacing the lowest-scoring picks).

    Args:
        num_experts: E, the router's expert count.
        offsets: a float tensor or sequence [E] added to the router logits (finite); None: zeros.
        off: expert indices switched off.
        on: expert indices forced on.
        strength: multiplies the offsets (finite).

    Raises ValueError naming the argument for an index out of range, an expert both off and on,
    non-finite offsets or strength, or a plan that switches off every expert; the checks that need
    the router's k (more forced than k, fewer than k experts left) run when the plan meets a router
    (`ExpertBank.check_k`, `actshift.route`, `actshift.patch`).
    """

    def __init__(self, num_experts: int, *, offsets=None, off=(), on=(), strength: float = 1.0):
        if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = E = int(num_experts)
        if offsets is None:
            offsets = torch.zeros(E)
        elif not isinstance(offsets, torch.Tensor):
            try:
                offsets = torch.as_tensor(offsets, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"offsets must be a float tensor or a sequence of numbers [{E}]: {e}") from None
        if not offsets.is_floating_point():
            raise TypeError(f"offsets must be a floating-point tensor, got {offsets.dtype}")
        if tuple(offsets.shape) != (E,):
            raise ValueError(f"offsets must have shape ({E},) (one per expert), got {tuple(offsets.shape)}")
        if not bool(torch.isfinite(offsets).all()):
            raise ValueError("offsets contains NaN or Inf")
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        self.offsets = offsets.detach().to("cpu", torch.float32).contiguous()
        self.strength = float(strength)
        self.off = _indices(off, "off", E)
        self.on = _indices(on, "on", E)
        both = set(self.off) & set(self.on)
        if both:
            raise ValueError(f"experts {sorted(both)} are both in off and on")
        if len(self.off) == E:
            raise ValueError(f"off switches off all {E} experts")

    @classmethod
    def identity(cls, num_experts: int) -> ExpertPlan:
        """The plan that changes nothing (a bank's filler for layers a request leaves alone)."""
        return cls(num_experts)

    def check_k(self, k: int, where: str = "") -> None:
        """ValueError when a router picking k experts cannot follow this plan."""
        at = f" ({where})" if where else ""
        if len(self.on) > k:
            raise ValueError(f"on forces {len(self.on)} experts but the router picks only k={k}{at}")
        if self.num_experts - len(self.off) < k:
            raise ValueError(f"off switches off {len(self.off)} of {self.num_experts} experts, leaving fewer than "
                             f"k={k}{at}")

    def __repr__(self) -> str:
        nz = int((self.offsets != 0).sum())
        return (f"ExpertPlan(num_experts={self.num_experts}, offsets: {nz} nonzero, off={list(self.off)}, "
                f"on={list(self.on)}, strength={self.strength})")


class ExpertBank:
    """S expert plans over the same E, stacked for the `route` op; row r of a batch uses plan
    slot[r] (-1: unedited).

    Tensors (CPU, copied per device on demand by `tensors(device)`): offsets [S, E] fp32 =
    strength * offsets, modes [S, E] int8 (0 free, 1 off, 2 on).
    """

    def __init__(self, plans: Sequence[ExpertPlan]):
        plans = [plans] if isinstance(plans, ExpertPlan) else list(plans)
        if not plans or not all(isinstance(p, ExpertPlan) for p in plans):
            raise TypeError("plans must be an ExpertPlan or a non-empty sequence of ExpertPlans")
        E = plans[0].num_experts
        for i, p in enumerate(plans):
            if p.num_experts != E:
                raise ValueError(f"plans[{i}] has {p.num_experts} experts but plans[0] has {E}")
        self.plans = plans
        self.num_experts = E
        self.offsets = torch.stack([p.offsets * p.strength for p in plans]).contiguous()
        self.modes = torch.full((len(plans), E), EXPERT_FREE, dtype=torch.int8)
        for i, p in enumerate(plans):
            self.modes[i, list(p.off)] = EXPERT_OFF
            self.modes[i, list(p.on)] = EXPERT_ON
        self.max_on = max(len(p.on) for p in plans)
        self.min_live = min(E - len(p.off) for p in plans)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.plans)

    def check_k(self, k: int, where: str = "") -> None:
        """ValueError naming the plan when a router picking k experts cannot follow it."""
        if self.max_on > k or self.min_live < k:
            for i, p in enumerate(self.plans):
                p.check_k(k, f"plan {i}" + (f", {where}" if where else ""))

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets, modes) on `device`, copied once per device."""
        t = self._on_device.get(device)
        if t is None:
            t = self._on_device[device] = (self.offsets.to(device), self.modes.to(device))
        return t


def as_expert_bank(plan) -> ExpertBank:
    """An ExpertBank from an ExpertPlan (its one-plan bank, built once and kept on the plan), a
    sequence of plans, or a bank."""
    if isinstance(plan, ExpertBank):
        return plan
    if isinstance(plan, ExpertPlan):
        bank = plan.__dict__.get("_bank")
        if bank is None:
            bank = plan.__dict__["_bank"] = ExpertBank(plan)
        return bank
    return ExpertBank(plan)
