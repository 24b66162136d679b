"""Argument validation shared by the OOD modules: errors name the argument."""

from __future__ import annotations

import math
import numbers

import torch


def check_number(
    value, name: str, low: float, high: float, *, include_low: bool = False, include_high: bool = True
) -> float:
    """value as a float inside (low, high] (by default); ValueError naming `name` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    above = value >= low if include_low else value > low
    below = value <= high if include_high else value < high
    if not (above and below):
        interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)
