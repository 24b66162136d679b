"""Typed public wrappers of the actshift ops: validation, backend dispatch, shape handling."""
from .steer import apply_steer, steer

__all__ = ["steer", "apply_steer"]
