"""`energy`: the energy score T·logsumexp(logits/T) (higher = more in-distribution)."""
from __future__ import annotations

import math
import numbers

import torch


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The energy score of Liu et al. (2020), an OOD confidence: T·logsumexp(logits / T).

    Args:
        logits: floating-point logits [..., C] (any leading dims; C >= 1 classes on the last dim).
        temperature: T > 0 (default 1, as in the paper); large T tends to T·log C + mean logit,
            small T to the max logit.

    Returns:
        fp32 [...]: the negative free energy, higher for inputs the classifier finds more
        in-distribution (the paper flags OOD when it is below a threshold). Same as
        OpenOOD's "ebo" postprocessor's confidence.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty class dim, got shape {tuple(logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    t = float(temperature)
    return t * torch.logsumexp(logits.float() / t, dim=-1)
