"""The plugin's configuration and the per-request arguments, shared by the front end and the workers.

Engine configuration: `additional_config={"actshift": {...}}` (`--additional-config` with `vllm
serve`); vLLM hashes additional_config into its compile cache key, so steered and unsteered engines
never share compiled code. Keys:
    plans       {name: path} or {name: {"path": path, "layers": [..]}}: actshift safetensors files
                (actshift.steering.formats.save) or llama.cpp GGUF control vectors; "layers" picks
                or (for a file holding one plan) assigns the layers. May be empty: plans can be
                added at run time (`add_plans`).
    max_plans   capacity of the plan bank (default 1024).
    max_strength  the largest |strength| a request may ask for (default 100).
    backend     the steer kernel backend ("auto", "cpu", "cuda", "triton", "reference").

Request arguments: `SamplingParams(extra_args={"actshift_plan": name, "actshift_strength": s})`, or
`"vllm_xargs": {...}` in an OpenAI request. The strength multiplies the plan's own strength (default
1.0); strength 0 or no plan leaves the request unsteered.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping

PLAN_KEY, STRENGTH_KEY = "actshift_plan", "actshift_strength"
DEFAULTS = {"plans": {}, "max_plans": 1024, "max_strength": 100.0, "backend": "auto"}


def engine_config(vllm_config) -> dict | None:
    """The "actshift" entry of vllm_config.additional_config, checked and with defaults; None when
    steering is not configured (the plugin then does nothing)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, Mapping) or "actshift" not in extra:
        return None
    cfg = extra["actshift"]
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"additional_config['actshift'] must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"additional_config['actshift'] has unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if not isinstance(out["plans"], Mapping):
        raise TypeError("additional_config['actshift']['plans'] must map plan names to files")
    for name, spec in out["plans"].items():
        check_name(name)
        path = spec.get("path") if isinstance(spec, Mapping) else spec
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"additional_config['actshift']['plans'][{name!r}] must be a path or {{'path': ..., 'layers': [...]}}")
    n = out["max_plans"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"additional_config['actshift']['max_plans'] must be a positive int, got {n!r}")
    if len(out["plans"]) > n:
        raise ValueError(f"additional_config['actshift'] names {len(out['plans'])} plans but max_plans is {n}")
    m = out["max_strength"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise ValueError(f"additional_config['actshift']['max_strength'] must be a positive number, got {m!r}")
    return out


def check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"plan names must be non-empty strings, got {name!r}")
    return name


def request_choice(extra_args, names, max_strength: float) -> tuple[str, float] | None:
    """(plan name, strength) asked for by a request's extra_args, None when it asks for no steering.
    Raises ValueError naming the argument for anything malformed, an unknown plan, or a strength
    that is not a finite number within ±max_strength."""
    if not extra_args:
        return None
    if not isinstance(extra_args, Mapping):
        raise ValueError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    ours = {k for k in extra_args if isinstance(k, str) and k.startswith("actshift")}
    unknown = sorted(ours - {PLAN_KEY, STRENGTH_KEY})
    if unknown:
        raise ValueError(f"extra_args: unknown actshift key(s) {unknown}; use {PLAN_KEY!r} and {STRENGTH_KEY!r}")
    if PLAN_KEY not in extra_args:
        if STRENGTH_KEY in extra_args:
            raise ValueError(f"extra_args: {STRENGTH_KEY!r} was given without {PLAN_KEY!r}")
        return None
    name = extra_args[PLAN_KEY]
    if not isinstance(name, str):
        raise ValueError(f"extra_args[{PLAN_KEY!r}] must be a plan name (a string), got {type(name).__name__}")
    if name not in names:
        known = ", ".join(sorted(names)[:20]) or "none loaded"
        raise ValueError(f"extra_args[{PLAN_KEY!r}]: unknown steering plan {name!r} (known: {known})")
    strength = extra_args.get(STRENGTH_KEY, 1.0)
    if isinstance(strength, str):  # `vllm serve` clients may send numbers as strings
        try:
            strength = float(strength)
        except ValueError:
            raise ValueError(f"extra_args[{STRENGTH_KEY!r}] must be a number, got {strength!r}") from None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ValueError(f"extra_args[{STRENGTH_KEY!r}] must be a number, got {type(strength).__name__}")
    strength = float(strength)
    if not math.isfinite(strength) or abs(strength) > max_strength:
        raise ValueError(f"extra_args[{STRENGTH_KEY!r}] must be finite and within ±{max_strength:g}, got {strength}")
    return (name, strength) if strength != 0.0 else None


def cache_salt(salt: str | None, name: str, version: int, strength: float) -> str:
    """The prefix-cache salt of a steered request: its own salt (if any) chained with the plan, the
    plan's version (bumped when it is replaced) and the strength, so KV blocks are shared only by
    requests steered identically, and never with unsteered ones."""
    key = f"{salt or ''}\x00actshift\x00{name}\x00{version}\x00{strength!r}"
    return "actshift-" + hashlib.sha256(key.encode()).hexdigest()[:32]
