"""Steering plans: what to do to the hidden states of one site, validated once, cached per device.

A plan is data, not code: the kernels read its tensors. Several plans stack into a bank so one batch
can carry a different plan per row (`slot`), which is how a server steers each request its own way.
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..reference import STEER_AFFINE, STEER_CONDITION, STEER_COSINE, STEER_LESS, STEER_RENORM

MAX_VECTORS = 16  # kernels keep the per-row coefficients in registers (csrc/include/actshift/steer.h)
MAX_DIRECTIONS = 16  # ablation directions per plan, same reason
MAX_MONITORS = 16  # monitor read-outs per plan, same reason
ORTHONORMAL_TOL = 1e-4  # max |U·Uᵀ − I| accepted as orthonormal (fp32 round-off of unit vectors)
_F32_MAX = torch.finfo(torch.float32).max


def _as_float_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers: {e}") from None
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    # Always a copy (later edits of the caller's tensor cannot reach the plan), checked after the
    # cast so that a value beyond fp32's range (1e300 in fp64) is caught rather than stored as inf.
    t = value.detach().to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf (or a value beyond float32's range)")
    return t


def _as_rows(value, name: str, limit: int) -> torch.Tensor:
    """[d] or [n, d] (1 <= n <= limit, d > 0) -> [n, d] fp32."""
    t = _as_float_tensor(value, name)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be [d] or [n, d] with n, d > 0, got shape {tuple(t.shape)}")
    if t.shape[0] > limit:
        raise ValueError(f"{name} holds {t.shape[0]} vectors; at most {limit} per plan")
    return t


def _as_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and abs(value) <= _F32_MAX):  # the kernels read it as fp32
        raise ValueError(f"{name} must be finite and within float32's range, got {value}")
    return float(value)


def _per_entry(value, name: str, n: int) -> torch.Tensor:
    """A number or [n] values -> [n] fp32."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((n,), _as_number(value, name), dtype=torch.float32)
    t = _as_float_tensor(value, name)
    if t.shape != (n,):
        raise ValueError(f"{name} must be a number or [{n}] values, got shape {tuple(t.shape)}")
    return t


def _builder(method):
    """Marks a method that returns a changed copy: the copy is frozen once the method has set it up."""

    @functools.wraps(method)
    def build(self, *args, **kwargs):
        return method(self, *args, **kwargs)._freeze()

    return build


def _orthonormal_rows(U: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt (via QR in fp64) keeping each row's direction; raises on dependent rows."""
    q, r = torch.linalg.qr(U.double().t())
    diag = r.diagonal()
    if bool((diag.abs() <= 1e-6 * U.double().norm(dim=1).max()).any()):
        raise ValueError("ablate directions are linearly dependent; cannot orthonormalize them")
    return (q * diag.sign()).t().float().contiguous()


class SteeringPlan:
    """One steering program for hidden states of size d, applied in one pass by `actshift.steer`.

    Read-outs use the input row x; then, each part optional and in this order,
      1. ablate/clamp   z = x − Σ_k (x·u_k − t_k) u_k        (`ablate`)
      2. affine         z = scale ⊙ z + bias                   (`affine`)
      3. add            z = z + Σ_j w_j v_j                    (`add=` / `add`)
      4. neurons        z[idx] = mul ⊙ z[idx] + add            (`neurons`)
    and y = x + strength · g · (z − x), g = given gate × condition (`condition`); `renorm` rescales
    y to ‖x‖. `monitor` adds read-outs x·Mᵀ, returned by `steer(..., return_monitors=True)`.

    Args:
        add: one vector [d] or m <= 16 vectors [m, d] (any float dtype; stored as fp32).
        weights: [m] coefficients of the add vectors, default all ones.
        strength: λ, scales the whole intervention.
        renorm: rescale each steered row to its input norm.

    A plan is immutable: setting an attribute raises AttributeError (its tensors and device caches
    stay consistent with what was validated). The builder methods and `with_strength` return a new
    plan with that part changed:

        plan = SteeringPlan(strength=4.0).ablate(u).add(v).condition(c, 0.2).monitor(M)
        weaker = plan.with_strength(1.0)
    """

    def __init__(self, add=None, weights=None, strength: float = 1.0, *, renorm: bool = False):
        self.strength = _as_number(strength, "strength")
        if not isinstance(renorm, bool):
            raise TypeError(f"renorm must be a bool, got {type(renorm).__name__}")
        self.renorm = renorm
        self.vectors: torch.Tensor | None = None  # [m, d]
        self.weights: torch.Tensor | None = None  # [m]
        self.directions: torch.Tensor | None = None  # [k, d], orthonormal rows
        self.targets: torch.Tensor | None = None  # [k]
        self.scale: torch.Tensor | None = None  # [d], with bias; both set or both None
        self.bias: torch.Tensor | None = None
        self.neuron_idx: torch.Tensor | None = None  # [n] int64, unique
        self.neuron_mul: torch.Tensor | None = None  # [n]
        self.neuron_add: torch.Tensor | None = None  # [n]
        self.condition_vector: torch.Tensor | None = None  # [d] as given
        self.condition_threshold = 0.0
        self.condition_kind = "cosine"
        self.condition_compare = ">"
        self.monitors: torch.Tensor | None = None  # [p, d]
        self._cache: dict = {}
        if add is not None:
            self._set_add(add, weights)
        elif weights is not None:
            raise ValueError("weights were given without add vectors")
        self._frozen = True

    # --- immutability --------------------------------------------------------------------------

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"SteeringPlan is immutable; cannot set {name!r}. Make a changed copy instead: "
                "plan.with_strength(s), or the builders .add / .ablate / .affine / .neurons / .condition / .monitor"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"SteeringPlan is immutable; cannot delete {name!r}")

    def _freeze(self) -> SteeringPlan:
        self.__dict__["_frozen"] = True
        return self

    # --- builders ------------------------------------------------------------------------------

    def _copy(self) -> SteeringPlan:
        """A mutable shallow copy with empty caches (builders set its parts, then `_builder` freezes it)."""
        new = copy.copy(self)
        new.__dict__["_frozen"] = False
        new._cache = {}
        return new

    @_builder
    def with_strength(self, strength: float) -> SteeringPlan:
        """The same plan with another strength λ (validated: a finite number)."""
        new = self._copy()
        new.strength = _as_number(strength, "strength")
        return new

    def apply(self, model, strength: float | None = None, *, layers=None, site: str = "block_output",
              backend: str = "auto"):
        """Patches `model` with this plan (optionally at another strength) and returns the handle,
        which is a context manager: `with plan.apply(model, 2.0): model.generate(...)` steers inside
        the block only. `layers`: an index or indices (default every layer); `site` as in SteeringSite.
        Shorthand for actshift.patch(model, steering=SteeringSite(plan, layers, site))."""
        from ..integrations.transformers import SteeringSite, patch

        plan = self if strength is None else self.with_strength(strength)
        return patch(model, steering=SteeringSite(plan, layers=layers, site=site), backend=backend)

    def _check_width(self, d: int, name: str) -> None:
        if self.hidden_size is not None and d != self.hidden_size:
            raise ValueError(f"{name} has hidden size {d}, but the plan's is {self.hidden_size}")

    def _set_add(self, vectors, weights) -> None:
        v = _as_rows(vectors, "add", MAX_VECTORS)
        self._check_width(v.shape[1], "add")
        m = v.shape[0]
        w = torch.ones(m, dtype=torch.float32) if weights is None else _as_float_tensor(weights, "weights")
        if w.shape != (m,):
            raise ValueError(f"weights must be [{m}] to match add, got shape {tuple(w.shape)}")
        self.vectors, self.weights = v, w

    @_builder
    def add(self, vectors, weights=None) -> SteeringPlan:
        """Adds Σ_j weights[j] · vectors[j] (vectors [d] or [m <= 16, d], weights [m], default ones)."""
        new = self._copy()
        new.vectors = new.weights = None
        new._set_add(vectors, weights)
        return new

    @_builder
    def ablate(self, directions, targets=None, *, orthonormalize: bool = False) -> SteeringPlan:
        """Sets the component of x along each direction u_k to targets[k] (default 0: ablation).

        directions: [d] or [k <= 16, d] with orthonormal rows. Rows that are not orthonormal are an
        error unless `orthonormalize=True`, which runs Gram-Schmidt in row order (targets then refer
        to the orthonormalized directions).
        """
        U = _as_rows(directions, "directions", MAX_DIRECTIONS)
        new = self._copy()
        new._check_width(U.shape[1], "directions")
        if orthonormalize:
            U = _orthonormal_rows(U)
        else:
            err = float((U.double() @ U.double().t() - torch.eye(U.shape[0], dtype=torch.float64)).abs().max())
            if err > ORTHONORMAL_TOL:
                raise ValueError(
                    f"directions must have orthonormal rows (max |U·Uᵀ − I| = {err:.3g}); "
                    "pass orthonormalize=True to orthonormalize them"
                )
        k = U.shape[0]
        new.directions = U
        new.targets = torch.zeros(k, dtype=torch.float32) if targets is None else _per_entry(targets, "targets", k)
        return new

    @_builder
    def affine(self, scale=None, bias=None) -> SteeringPlan:
        """z = scale ⊙ z + bias per dimension (each [d]; scale defaults to ones, bias to zeros)."""
        if scale is None and bias is None:
            raise ValueError("affine needs a scale, a bias, or both")
        new = self._copy()
        parts = {}
        for name, value in (("scale", scale), ("bias", bias)):
            if value is not None:
                t = _as_float_tensor(value, name)
                if t.dim() != 1 or t.shape[0] == 0:
                    raise ValueError(f"{name} must be [d], got shape {tuple(t.shape)}")
                new._check_width(t.shape[0], name)
                parts[name] = t
        d = next(iter(parts.values())).shape[0]
        if scale is not None and bias is not None and parts["scale"].shape != parts["bias"].shape:
            raise ValueError(
                f"scale and bias must both be [d], got {tuple(parts['scale'].shape)} and {tuple(parts['bias'].shape)}"
            )
        new.scale = parts.get("scale", torch.ones(d, dtype=torch.float32))
        new.bias = parts.get("bias", torch.zeros(d, dtype=torch.float32))
        return new

    @_builder
    def neurons(self, idx, mul=1.0, add=0.0) -> SteeringPlan:
        """z[idx] = mul ⊙ z[idx] + add on a non-empty set of distinct indices (mul/add: number or [n])."""
        if not isinstance(idx, torch.Tensor):
            try:
                idx = torch.as_tensor(idx)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"idx must be a tensor or a sequence of ints: {e}") from None
        if idx.numel() == 0:
            raise ValueError("idx is empty; give at least one neuron index")
        if idx.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"idx must hold integers, got {idx.dtype}")
        if idx.dim() > 1:
            raise ValueError(f"idx must be a 1-d index set, got shape {tuple(idx.shape)}")
        idx = idx.detach().to("cpu", torch.int64, copy=True).reshape(-1)  # a copy: the caller's stays theirs
        if bool((idx < 0).any()):
            raise ValueError(f"idx holds a negative index {int(idx.min())}")
        d = self.hidden_size
        if d is not None and int(idx.max()) >= d:
            raise ValueError(f"idx holds {int(idx.max())}, out of range for hidden size {d}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("idx holds repeated indices; each neuron may appear once")
        n = idx.numel()
        new = self._copy()
        new.neuron_idx = idx.contiguous()
        new.neuron_mul, new.neuron_add = _per_entry(mul, "mul", n), _per_entry(add, "add", n)
        return new

    @_builder
    def condition(self, vector, threshold: float = 0.0, kind: str = "cosine", compare: str = ">") -> SteeringPlan:
        """Steers only rows whose score `compare` threshold; score = cos(x, vector) for kind="cosine",
        x·vector for kind="projection" (computed on the input row)."""
        if kind not in ("cosine", "projection"):
            raise ValueError(f'kind must be "cosine" or "projection", got {kind!r}')
        if compare not in (">", "<"):
            raise ValueError(f'compare must be ">" or "<", got {compare!r}')
        v = _as_float_tensor(vector, "vector")
        if v.dim() != 1 or v.shape[0] == 0:
            raise ValueError(f"vector must be [d], got shape {tuple(v.shape)}")
        if kind == "cosine" and float(v.norm()) == 0.0:
            raise ValueError("vector is zero; a cosine condition needs a non-zero vector")
        new = self._copy()
        new._check_width(v.shape[0], "vector")
        new.condition_vector = v
        new.condition_threshold = _as_number(threshold, "threshold")
        new.condition_kind, new.condition_compare = kind, compare
        return new

    @_builder
    def monitor(self, matrix) -> SteeringPlan:
        """Read-outs x·matrixᵀ of the input rows (matrix [d] or [p <= 16, d])."""
        M = _as_rows(matrix, "matrix", MAX_MONITORS)
        new = self._copy()
        new._check_width(M.shape[1], "matrix")
        new.monitors = M
        return new

    # --- properties ----------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int | None:
        """d, or None for a plan with no vector part yet."""
        for t in (self.vectors, self.directions, self.scale, self.condition_vector, self.monitors):
            if t is not None:
                return t.shape[-1]
        return None

    @property
    def num_vectors(self) -> int:
        return 0 if self.vectors is None else self.vectors.shape[0]

    @property
    def num_monitors(self) -> int:
        return 0 if self.monitors is None else self.monitors.shape[0]

    @property
    def is_additive(self) -> bool:
        """Only add vectors (or nothing): the plain additive kernel runs it."""
        return (self.directions is None and self.scale is None and self.neuron_idx is None
                and self.condition_vector is None and self.monitors is None and not self.renorm)

    def __repr__(self) -> str:
        parts = [f"strength={self.strength}"]
        if self.directions is not None:
            parts.append(f"ablate={self.directions.shape[0]}")
        if self.scale is not None:
            parts.append("affine")
        if self.vectors is not None:  # norms, so vectors of different recipes can be compared
            norms = ", ".join(f"{float(n):.3g}" for n in self.vectors.norm(dim=1))
            parts.append(f"add={self.vectors.shape[0]} (norm {norms})")
        if self.neuron_idx is not None:
            parts.append(f"neurons={self.neuron_idx.numel()}")
        if self.condition_vector is not None:
            parts.append(f"condition={self.condition_kind}{self.condition_compare}{self.condition_threshold}")
        if self.monitors is not None:
            parts.append(f"monitor={self.monitors.shape[0]}")
        if self.renorm:
            parts.append("renorm")
        return f"SteeringPlan(d={self.hidden_size}, {', '.join(parts)})"


class SteeringProgram(NamedTuple):
    """A bank's padded program tensors, in the argument order of torch.ops.actshift.steer_program
    (layout: actshift.reference.steer_program)."""

    meta: torch.Tensor
    scalars: torch.Tensor
    ablate: torch.Tensor
    targets: torch.Tensor
    affine: torch.Tensor
    vectors: torch.Tensor
    weights: torch.Tensor
    neuron_idx: torch.Tensor
    neuron_val: torch.Tensor
    condition: torch.Tensor
    monitor: torch.Tensor


def _pad_rows(parts: list[torch.Tensor | None], width: int, tail: tuple[int, ...],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacks per-plan [n_i, *tail] tensors (None = none) into [S, width, *tail] of `dtype`, zero-padded
    (indices pad as ints: through fp32 they would round past 2^24)."""
    out = torch.zeros(len(parts), width, *tail, dtype=dtype)
    for i, t in enumerate(parts):
        if t is not None:
            out[i, : t.shape[0]] = t
    return out


class SteeringBank:
    """Several plans stacked for per-row selection: row r uses plan slot[r] (-1 leaves it alone).

    The stacked tensors are built once per device and reused by every call. Each plan's weights are
    static, so its vectors fold into one: the kernels then read one vector per row instead of m
    (the same sum, rounded once in fp32 instead of per row). Per-row weights need the unfolded
    vectors, a second cached layout. Plans may use different parts; absent parts are zero counts.
    """

    def __init__(self, plans: Sequence[SteeringPlan]):
        plans = list(plans)
        if not plans:
            raise ValueError("plans must hold at least one SteeringPlan")
        for i, p in enumerate(plans):
            if not isinstance(p, SteeringPlan):
                raise TypeError(f"plans[{i}] must be a SteeringPlan, got {type(p).__name__}")
        sizes = [p.hidden_size for p in plans]
        known = [d for d in sizes if d is not None]
        if not known:
            raise ValueError("plans set no vector part, so their hidden size is unknown")
        d = known[0]
        for i, (p, di) in enumerate(zip(plans, sizes)):
            if di is not None and di != d:
                raise ValueError(f"plans[{i}] has hidden size {di}, plans[0] has {d}")
            if p.neuron_idx is not None and int(p.neuron_idx.max()) >= d:
                top = int(p.neuron_idx.max())
                raise ValueError(f"plans[{i}] has neuron index {top}, out of range for hidden size {d}")
        self.plans = plans
        self._d = d
        self.is_additive = all(p.is_additive for p in plans)
        self.max_vectors = max(p.num_vectors for p in plans)
        self.num_monitors = max(p.num_monitors for p in plans)
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def hidden_size(self) -> int:
        return self._d

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Additive part only: (vectors [S, 1, d], weights [S, 1], strength [S]) fp32 on `device`."""
        key = ("add", device)
        cached = self._cache.get(key)
        if cached is None:
            vectors = torch.stack([self._folded(p) for p in self.plans])[:, None]
            weights = torch.ones(len(self.plans), 1, dtype=torch.float32)
            strength = torch.tensor([p.strength for p in self.plans], dtype=torch.float32)
            cached = tuple(t.to(device).contiguous() for t in (vectors, weights, strength))
            self._cache[key] = cached
        return cached

    def _folded(self, p: SteeringPlan) -> torch.Tensor:
        return torch.zeros(self._d, dtype=torch.float32) if p.vectors is None else p.weights @ p.vectors

    def program(self, device: torch.device, folded: bool = True) -> SteeringProgram:
        """The padded program tensors on `device`. folded=True sums each plan's weighted add vectors
        into one (M = 1); folded=False keeps them apart (M = max m) for per-row weights."""
        key = ("program", device, folded)
        cached = self._cache.get(key)
        if cached is None:
            cached = SteeringProgram(*(t.to(device).contiguous() for t in self._build(folded)))
            self._cache[key] = cached
        return cached

    def _build(self, folded: bool) -> SteeringProgram:
        plans, d = self.plans, self._d
        S = len(plans)
        # Counts as Python ints (not tensor reductions): the sizes stay static if this first runs
        # while torch.compile traces.
        meta_rows = []
        for p in plans:
            flags = (STEER_AFFINE if p.scale is not None else 0) | (STEER_RENORM if p.renorm else 0)
            if p.condition_vector is not None:
                flags |= STEER_CONDITION | (STEER_COSINE if p.condition_kind == "cosine" else 0)
                flags |= STEER_LESS if p.condition_compare == "<" else 0
            m = min(p.num_vectors, 1) if folded else p.num_vectors
            k = 0 if p.directions is None else p.directions.shape[0]
            n = 0 if p.neuron_idx is None else p.neuron_idx.numel()
            meta_rows.append([flags, k, m, n, p.num_monitors])
        meta = torch.tensor(meta_rows, dtype=torch.int32)
        scalars = torch.tensor([[p.strength, p.condition_threshold] for p in plans], dtype=torch.float32)
        K, M, N = (max(row[c] for row in meta_rows) for c in (1, 2, 3))
        has_affine = any(p.scale is not None for p in plans)
        has_condition = any(p.condition_vector is not None for p in plans)
        if folded:
            vectors = _pad_rows([None if p.vectors is None else self._folded(p)[None] for p in plans], M, (d,))
            weights = torch.ones(S, M, dtype=torch.float32)
        else:
            vectors = _pad_rows([p.vectors for p in plans], M, (d,))
            weights = _pad_rows([p.weights for p in plans], M, ())
        cond = []  # unit-norm for cosine, so the kernels divide by ‖x‖ only
        for p in plans:
            c = p.condition_vector
            cond.append(None if c is None else (c / c.norm() if p.condition_kind == "cosine" else c)[None])
        neuron_val = torch.zeros(S, 2, N, dtype=torch.float32)
        for i, p in enumerate(plans):
            if p.neuron_idx is not None:
                neuron_val[i, 0, : p.neuron_idx.numel()] = p.neuron_mul
                neuron_val[i, 1, : p.neuron_idx.numel()] = p.neuron_add
        return SteeringProgram(
            meta=meta,
            scalars=scalars,
            ablate=_pad_rows([p.directions for p in plans], K, (d,)),
            targets=_pad_rows([p.targets for p in plans], K, ()),
            affine=_pad_rows([None if p.scale is None else torch.stack([p.scale, p.bias]) for p in plans],
                             2 if has_affine else 0, (d,)),
            vectors=vectors,
            weights=weights,
            neuron_idx=_pad_rows([p.neuron_idx for p in plans], N, (), torch.int32),
            neuron_val=neuron_val,
            condition=_pad_rows(cond, 1 if has_condition else 0, (d,)),
            monitor=_pad_rows([p.monitors for p in plans], self.num_monitors, (d,)),
        )


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
