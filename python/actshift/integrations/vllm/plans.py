"""Named steering plans for the vLLM plugin: {layer: SteeringPlan} per name, read from actshift files,
and their transport to the workers (tensors and JSON, which vLLM's RPC serializes safely)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from ...steering import formats
from ...steering.plan import SteeringPlan

LayerPlans = dict[int, SteeringPlan]


def _check_layers(layers, num_layers: int, what: str) -> list[int]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: layers must be a list of ints, got {layers!r}") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{what}: layer(s) {bad} out of range for a model with {num_layers} layers")
    return sorted(set(layers))


def as_layer_plans(value, num_layers: int, hidden: int, what: str, layers=None) -> LayerPlans:
    """A plan given as a SteeringPlan (every layer, or `layers`), {layer: SteeringPlan | vector}, or a
    path to an actshift safetensors file / GGUF control vector -> {layer: SteeringPlan}."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if path.endswith(".gguf"):
            value, _ = formats.import_gguf(path)
        else:
            value, _ = formats.load(path)
    if isinstance(value, SteeringPlan):
        chosen = range(num_layers) if layers is None else _check_layers(layers, num_layers, what)
        out = {i: value for i in chosen}
    elif isinstance(value, Mapping):
        out = {}
        for layer, item in value.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"{what}: layer keys must be ints, got {layer!r}")
            out[layer] = item if isinstance(item, SteeringPlan) else SteeringPlan(add=item)
        _check_layers(list(out), num_layers, what)
        if layers is not None:
            keep = _check_layers(layers, num_layers, what)
            out = {i: p for i, p in out.items() if i in keep}
    else:
        raise TypeError(f"{what} must be a SteeringPlan, a {{layer: plan or vector}} dict or a file path, "
                        f"got {type(value).__name__}")
    if not out:
        raise ValueError(f"{what} steers no layer")
    for layer, plan in out.items():
        if plan.hidden_size not in (None, hidden):
            raise ValueError(f"{what}: layer {layer} has hidden size {plan.hidden_size}, the model's is {hidden}")
    return dict(sorted(out.items()))


def from_config(spec, num_layers: int, hidden: int, name: str) -> LayerPlans:
    """One entry of additional_config['actshift']['plans']: a path or {"path": ..., "layers": [...]}."""
    if isinstance(spec, Mapping):
        return as_layer_plans(spec["path"], num_layers, hidden, f"plan {name!r}", spec.get("layers"))
    return as_layer_plans(spec, num_layers, hidden, f"plan {name!r}")


def encode(plans: Mapping[str, LayerPlans]) -> dict:
    """{name: {layer: plan}} -> {name: {"layers": {layer: JSON fields}, "tensors": {key: tensor}}}."""
    out = {}
    for name, layer_plans in plans.items():
        tensors: dict[str, torch.Tensor] = {}
        fields = {str(i): formats._plan_fields(p, f"plan.{i}", tensors) for i, p in layer_plans.items()}
        out[name] = {"layers": json.dumps(fields), "tensors": tensors}
    return out


def decode(payload: Mapping) -> dict[str, LayerPlans]:
    """The inverse of `encode`; rebuilding through SteeringPlan's builders validates every plan again."""
    return {name: {int(i): formats._build_plan(f, item["tensors"]) for i, f in json.loads(item["layers"]).items()}
            for name, item in payload.items()}
