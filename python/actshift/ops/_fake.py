"""Shared check of the C++ ops' fake (Meta) implementations.

The dispatcher runs an op's Meta kernel, which is its fake implementation, as soon as any argument
is a meta tensor; a raw call mixing meta and CPU tensors would then "succeed" with uninitialised
outputs (or leave `out` untouched). The C++ implementations reject mixed devices, so the fakes do
too, with the same message.
"""
from __future__ import annotations

import torch


def same_device(op: str, x: torch.Tensor, /, x_name: str = "x", **tensors) -> None:
    """Raises ValueError naming the first tensor argument (None skipped) not on x's device."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {x_name} is on {x.device}")
