"""actshift: fused kernels for inference-time activation interventions.

    import actshift
    plan = actshift.SteeringPlan(add=v, strength=4.0)
    y = actshift.steer(hidden, plan)
    shaped = actshift.percentile_scale(features, 85, "scale")
    y = actshift.sparse_linear(x, linear.weight.t().contiguous(), 0.1)
    handle = actshift.patch(model, steering=plan)          # transformers models, per instance
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import experts, sparse
from .experts import ExpertBank, ExpertPlan
from .backends import BackendUnavailableError, get_backend, set_backend
from .info import info
from .integrations.transformers import PatchHandle, SteeringSite, patch, unpatch
from .ops import (
    adascale_stats,
    apply_steer,
    cats_mlp,
    energy,
    percentile_scale,
    relu_ffn,
    route,
    scale_ratio,
    sparse_linear,
    sparse_threshold,
    steer,
)
from .sparse import relufy, sparsity_report
from .steering import SteeringBank, SteeringPlan, extract_activations, recipes

__all__ = [
    "__version__",
    # ops
    "steer",
    "apply_steer",
    "percentile_scale",
    "scale_ratio",
    "energy",
    "adascale_stats",
    "sparse_threshold",
    "sparse_linear",
    "relu_ffn",
    "cats_mlp",
    "route",
    "ExpertPlan",
    "ExpertBank",
    "experts",
    # steering plans, recipes, extraction
    "SteeringPlan",
    "SteeringBank",
    "extract_activations",
    "recipes",
    # model patching and sparse activations
    "patch",
    "unpatch",
    "SteeringSite",
    "PatchHandle",
    "sparse",
    "relufy",
    "sparsity_report",
    # backends
    "set_backend",
    "get_backend",
    "info",
    "BackendUnavailableError",
]
