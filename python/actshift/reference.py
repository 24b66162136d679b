"""Pure-PyTorch reference implementations: the executable truth of every op contract.

Each function computes in fp32 and returns the input's dtype. They are the `reference` backend and
the oracle of the tests; kernels must match them within the tolerance table of the README.
"""
from __future__ import annotations

import torch


def steer(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    gate: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive steering of rows: y = x + λ_s · g · Σ_j w_{s,j} v_{s,j}.

    x [rows, d]; vectors [S, m, d], weights [S, m], strength [S] (fp32) form a bank of S plans;
    gate [rows] (fp32, default 1); slot [rows] picks each row's plan (default 0; -1, and like the
    kernels any value outside [0, S), leaves the row untouched).
    """
    rows = x.shape[0]
    s = torch.zeros(rows, dtype=torch.long, device=x.device) if slot is None else slot.long()
    keep = (s < 0) | (s >= vectors.shape[0])
    s = torch.where(keep, 0, s)
    g = torch.ones(rows, device=x.device) if gate is None else gate.float()
    coef = (strength[s] * g)[:, None] * weights[s]  # [rows, m]
    delta = torch.einsum("rm,rmd->rd", coef, vectors[s])
    y = (x.float() + delta).to(x.dtype)
    return torch.where(keep[:, None], x, y)
