"""Steering plans: what to do to the hidden states of one site, validated once, cached per device.

A plan is data, not code: the kernels read its tensors. Several plans stack into a bank so one batch
can carry a different plan per row (`slot`), which is how a server steers each request its own way.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


MAX_VECTORS = 16  # kernels keep the per-row coefficients in registers (csrc/include/actshift/steer.h)


def _as_float_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers: {e}") from None
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value.detach().to(torch.float32)


@dataclass(eq=False)
class SteeringPlan:
    """Additive steering: y = x + strength · gate · Σ_j weights[j] · add[j].

    Args:
        add: one vector [d] or m vectors [m, d] (any float dtype; stored as fp32).
        weights: [m] coefficients, default all ones.
        strength: λ, scales the whole intervention.

    The full program of the contract (ablation, affine maps, neuron edits, conditions, monitors,
    renorm) extends this same class and the same single-pass kernel.
    """

    add: torch.Tensor
    weights: torch.Tensor | Sequence[float] | None = None
    strength: float = 1.0
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        add = _as_float_tensor(self.add, "add")
        if add.dim() == 1:
            add = add[None]
        if add.dim() != 2 or add.shape[1] == 0:
            raise ValueError(f"add must be [d] or [m, d] with d > 0, got shape {tuple(self.add.shape)}")
        if add.shape[0] > MAX_VECTORS:
            raise ValueError(f"add holds {add.shape[0]} vectors; at most {MAX_VECTORS} per plan")
        m = add.shape[0]
        weights = torch.ones(m) if self.weights is None else _as_float_tensor(self.weights, "weights")
        if weights.shape != (m,):
            raise ValueError(f"weights must be [{m}] to match add, got shape {tuple(weights.shape)}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise TypeError(f"strength must be a number, got {type(self.strength).__name__}")
        if not math.isfinite(self.strength):
            raise ValueError(f"strength must be finite, got {self.strength}")
        self.add, self.weights, self.strength = add.contiguous(), weights.to(add.device), float(self.strength)

    @property
    def hidden_size(self) -> int:
        return self.add.shape[1]

    @property
    def num_vectors(self) -> int:
        return self.add.shape[0]


class SteeringBank:
    """Several plans stacked for per-row selection: row r uses plan slot[r] (-1 leaves it alone).

    The stacked tensors are built once per device and reused by every call. Each plan's weights are
    static, so its vectors fold into one: the kernels then read one vector per row instead of m
    (the same sum, rounded once in fp32 instead of per row).
    """

    def __init__(self, plans: Sequence[SteeringPlan]):
        plans = list(plans)
        if not plans:
            raise ValueError("plans must hold at least one SteeringPlan")
        for i, p in enumerate(plans):
            if not isinstance(p, SteeringPlan):
                raise TypeError(f"plans[{i}] must be a SteeringPlan, got {type(p).__name__}")
        d = plans[0].hidden_size
        for i, p in enumerate(plans):
            if p.hidden_size != d:
                raise ValueError(f"plans[{i}] has hidden size {p.hidden_size}, plans[0] has {d}")
        self.plans = plans
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def hidden_size(self) -> int:
        return self.plans[0].hidden_size

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors [S, 1, d], weights [S, 1], strength [S]) in fp32 on `device`."""
        cached = self._cache.get(device)
        if cached is None:
            vectors = torch.stack([p.weights.cpu() @ p.add.cpu() for p in self.plans])[:, None]
            weights = torch.ones(len(self.plans), 1)
            strength = torch.tensor([p.strength for p in self.plans])
            cached = tuple(t.to(device).contiguous() for t in (vectors, weights, strength))
            self._cache[device] = cached
        return cached


def as_bank(plan) -> SteeringBank:
    """Accepts a SteeringPlan, a SteeringBank, or a sequence of plans."""
    if isinstance(plan, SteeringBank):
        return plan
    if isinstance(plan, SteeringPlan):
        bank = plan._cache.get("bank")
        if bank is None:
            bank = plan._cache["bank"] = SteeringBank([plan])
        return bank
    if isinstance(plan, Sequence) and not isinstance(plan, (str, bytes)):
        return SteeringBank(plan)
    raise TypeError(f"plan must be a SteeringPlan, a SteeringBank or a list of plans, got {type(plan).__name__}")
