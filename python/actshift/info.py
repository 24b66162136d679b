"""`actshift.info()`: versions and which backends are built, and why not."""
from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from . import _ext, backends


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """A dict of versions, the build record, and per-backend availability with reasons."""
    from . import __version__

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        "actshift": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "build": _ext.build_info(),
        "backends": {name: backends.unavailable_reason(name, device) or "available" for name in backends.BACKENDS},
        "auto_backend_for_" + device.type: backends.resolve("auto", device),
    }


def format_info(d: dict[str, Any]) -> str:
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items() if v != ""]  # no empty "reason:" lines
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
