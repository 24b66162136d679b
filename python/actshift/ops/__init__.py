"""Typed public wrappers of the actshift ops: validation, backend dispatch, shape handling."""
from .adascale import adascale_stats
from .energy import energy
from .percentile import percentile_scale, scale_ratio
from .steer import apply_steer, steer

__all__ = ["steer", "apply_steer", "percentile_scale", "scale_ratio", "energy", "adascale_stats"]
