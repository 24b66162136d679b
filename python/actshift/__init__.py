"""actshift: fused kernels for inference-time activation interventions.

    import actshift
    plan = actshift.SteeringPlan(add=v, strength=4.0)
    y = actshift.steer(hidden, plan)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import BackendUnavailableError, get_backend, set_backend
from .info import info
from .ops import apply_steer, steer
from .steering import SteeringBank, SteeringPlan

__all__ = [
    "__version__",
    "steer",
    "apply_steer",
    "SteeringPlan",
    "SteeringBank",
    "set_backend",
    "get_backend",
    "info",
    "BackendUnavailableError",
]
