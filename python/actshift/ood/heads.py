"""Logits of SCALE and AdaSCALE computed from the scale ratio alone, never the shaped features.

SCALE multiplies each sample's feature vector z [D] by one scalar, e^r with r = Σz / Σ top-k(z), so
the linear head (W [C, D], b [C]) gives

    W (z·e^r) + b = e^r · (W z) + b,

and the shaped features need not be written: one pass for r (`actshift.scale_ratio`), one GEMM,
and a per-row scale in the epilogue. The variants:

    "scale"       r from z,        logits = e^r · (W z) + b             (Xu et al., ICLR 2024)
    "adascale_a"  r from relu(z),  logits = e^r · (W z) + b             (AdaSCALE-A: ReLU only inside r)
    "adascale_l"  r from relu(z),  logits = r² · (W z + b)              (AdaSCALE-L: bias scaled too)

k = D − round(D·p/100) as in `percentile_scale`; p may differ per row (AdaSCALE). Logits are fp32
(e^r reaches ~2e4 at p = 90, too large to apply in fp16). A row whose top-k sum is 0 has r = NaN or
Inf and gives NaN/Inf logits, as `percentile_scale` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import scale_ratio
from ..ops.percentile import as_rows

VARIANTS = ("scale", "adascale_a", "adascale_l")


def check_head(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raises ValueError/TypeError, naming the argument, unless weight is [C, D] with z's D, dtype and
    device, and bias is None or [C] on the same device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != z.shape[1]:
        raise ValueError(
            f"weight must be [C, D] with D = {z.shape[1]} (the features' size), got {tuple(weight.shape)}"
        )
    if weight.dtype != z.dtype or weight.device != z.device:
        raise ValueError(
            f"weight must match z's dtype and device ({z.dtype}, {z.device}), "
            f"got {weight.dtype}, {weight.device}"
        )
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(
            f"bias must be [C] with C = {weight.shape[0]} (weight's rows), got {tuple(bias.shape)}"
        )
    if bias.device != z.device:
        raise ValueError(f"bias must be on z's device ({z.device}), got {bias.device}")


def scaled_logits(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    percentile,
    variant: str = "scale",
    *,
    allow_small_percentile: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """fp32 logits [N, C] of the head (weight [C, D], bias [C] or None) on SCALE- or AdaSCALE-shaped
    features z [N, D] (or [N, D, 1, 1]); percentile is a number or one value per row (see the module
    docstring for the variants)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    z = as_rows(z)
    check_head(z, weight, bias)
    r = scale_ratio(z if variant == "scale" else z.clamp(min=0), percentile,
                    allow_small_percentile=allow_small_percentile, backend=backend)
    wz = F.linear(z, weight).float()
    b = None if bias is None else bias.float()
    if variant == "adascale_l":
        return (wz if b is None else wz + b) * (r * r)[:, None]
    scaled = wz * torch.exp(r)[:, None]
    return scaled if b is None else scaled + b
