"""actshift: fused kernels for inference-time activation interventions.

    import actshift
    plan = actshift.SteeringPlan(add=v, strength=4.0)
    y = actshift.steer(hidden, plan)
    shaped = actshift.percentile_scale(features, 85, "scale")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import BackendUnavailableError, get_backend, set_backend
from .info import info
from .ops import adascale_stats, apply_steer, energy, percentile_scale, scale_ratio, steer
from .steering import SteeringBank, SteeringPlan

# sparse ops
from .ops import cats_mlp, relu_ffn, sparse_linear, sparse_threshold  # noqa: E402
# --- model patching (integrations/transformers.py) ---
from .integrations.transformers import PatchHandle, SteeringSite, patch, unpatch
# --- end model patching ---

__all__ = [
    "__version__",
    "steer",
    "apply_steer",
    "percentile_scale",
    "scale_ratio",
    "energy",
    "adascale_stats",
    "SteeringPlan",
    "SteeringBank",
    "set_backend",
    "get_backend",
    "info",
    "BackendUnavailableError",
    # model patching
    "patch",
    "unpatch",
    "SteeringSite",
    "PatchHandle",
]
__all__ += ["sparse_threshold", "sparse_linear", "relu_ffn", "cats_mlp"]  # sparse ops
