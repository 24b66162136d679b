"""Aggregators: how a set of contrastive activation pairs becomes one steering vector.

    "mean"      CAA / steering-vectors' default: mean(positive − negative)          (raw scale)
    "pca"       repeng's pca_diff: first principal component of the differences   (unit norm)
    "logistic"  steering-vectors' logistic_aggregator: the weight vector of an L2-regularized
                logistic regression separating positives from negatives            (unit norm)
    a callable  (positive [n, d], negative [n, d]) -> [d]
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .recipes import _paired, mean_difference, pca_direction

AGGREGATORS = ("mean", "pca", "logistic")
Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (positive, negative) -> [d]


def logistic_direction(positive: torch.Tensor, negative: torch.Tensor, *, C: float = 1.0,
                       tol: float = 1e-10, max_iter: int = 100) -> torch.Tensor:
    """The unit weight vector of a logistic regression between paired activations, [d] fp32.

    As in steering-vectors, each pair is centered on its midpoint first (so the classifier sees
    ±(p − n)/2 and nothing that the pair shares), labels are +1 / −1, there is no intercept, and
    the fit minimizes scikit-learn's objective ½‖w‖² + C·Σ log(1 + exp(−y·xᵀw)).

    The minimizer lies in the span of the samples (the penalty removes any other component), so
    the fit runs Newton's method in that r-dimensional span (r ≤ min(2n, d)): the Hessian
    I + C·ZᵀDZ is positive definite and the iteration converges quadratically, in fp64.
    """
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
        raise ValueError(f"C must be a positive number, got {C!r}")
    p, n = _paired(positive, negative)
    half = (p - n) / 2
    x = torch.cat([half, -half])  # pair-centered samples
    y = torch.cat([torch.ones(len(half), dtype=x.dtype), -torch.ones(len(half), dtype=x.dtype)])
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > s.max() * max(x.shape) * torch.finfo(x.dtype).eps
    if not bool(keep.any()):
        raise ValueError("positive/negative: every pair is identical; there is nothing to separate")
    z = u[:, keep] * s[keep]  # samples in the span's coordinates: x = z @ vh[keep]
    b = torch.zeros(z.shape[1], dtype=x.dtype)

    def objective(b: torch.Tensor) -> torch.Tensor:
        return 0.5 * b @ b + C * torch.nn.functional.softplus(-y * (z @ b)).sum()

    f = objective(b)
    for _ in range(max_iter):
        margin = y * (z @ b)
        grad = b - C * z.t() @ (y * torch.sigmoid(-margin))
        if float(grad.norm()) <= tol * max(1.0, float(b.norm())):
            break
        weight = torch.sigmoid(margin) * torch.sigmoid(-margin)
        hessian = torch.eye(len(b), dtype=x.dtype) + C * (z.t() * weight) @ z
        step = torch.linalg.solve(hessian, grad)
        t = 1.0
        while True:  # backtracking (Armijo) keeps every step a descent step
            candidate = b - t * step
            f_new = objective(candidate)
            if f_new <= f - 1e-4 * t * (grad @ step) or t < 1e-10:
                break
            t /= 2
        b, f = candidate, f_new
    w = b @ vh[keep]
    return (w / w.norm()).float()


def aggregate(positive: torch.Tensor, negative: torch.Tensor,
              aggregator: str | Aggregator = "mean") -> torch.Tensor:
    """One steering vector [d] (fp32) from paired activations [n, d] (row i of each = pair i)."""
    if aggregator == "mean":
        return mean_difference(positive, negative)
    if aggregator == "pca":
        return pca_direction(positive, negative)
    if aggregator == "logistic":
        return logistic_direction(positive, negative)
    if not callable(aggregator):
        raise ValueError(
            f"aggregator must be one of {', '.join(AGGREGATORS)} or a callable; got {aggregator!r}")
    v = aggregator(positive, negative)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != (positive.shape[1],):
        raise ValueError(f"aggregator must return a floating-point tensor [{positive.shape[1]}]")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("aggregator returned NaN or Inf")
    return v.detach().float().cpu()
