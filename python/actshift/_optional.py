"""Optional dependencies: import them where needed, with an install hint naming the pip extra."""
from __future__ import annotations

import importlib
from types import ModuleType

# module -> (pip package, actshift extra that installs it)
PACKAGES = {
    "gguf": ("gguf", "steering"),
    "safetensors": ("safetensors", "steering"),
    "transformers": ("transformers", "transformers"),
    "vllm": ("vllm", "vllm"),
    "matplotlib": ("matplotlib", "bench"),
}


def require(module: str, purpose: str) -> ModuleType:
    """Imports `module` (e.g. "safetensors.torch"), or raises ImportError saying which package and
    which actshift extra provide it, and what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package, extra = PACKAGES[top]
        raise ImportError(f"{purpose} needs the optional package {package!r}, which is not installed: "
                          f"pip install 'actshift[{extra}]' (or pip install {package})") from e
