"""Loads the compiled extension `actshift._C`, refusing a binary built for another torch.

A C++ extension is tied to the exact torch it was compiled against; loading it into another one
fails with an undefined-symbol error at best. setup.py records the versions in _build_info.json,
and this module compares them before loading, so a mismatch becomes a clear message in
`actshift.info()` and in the error of any backend that needs the extension.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD_HINT = "rebuild with `pip install --no-build-isolation .` (or `make build`)"


def build_info() -> dict[str, Any]:
    """What setup.py recorded about the build ({} when actshift was never built here)."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load() -> tuple[bool, str]:
    info = build_info()
    if not info:
        return False, f"no build record found; {REBUILD_HINT}"
    if not info.get("cpu"):
        return False, info.get("cpu_reason") or "extension not built"
    built = info.get("torch")
    if built != torch.__version__:
        return False, f"extension built for torch {built} but torch {torch.__version__} is running; {REBUILD_HINT}"
    try:
        importlib.import_module("actshift._C")
    except ImportError as e:  # missing file, or a stale binary from another toolchain
        return False, f"cannot load actshift._C ({e}); {REBUILD_HINT}"
    return True, ""


EXT_LOADED, EXT_REASON = _load()
