"""`actshift.patch(model, experts=...)`: expert steering at the routers of a transformers MoE model.

Each MoE layer's router (integrations/architectures.py, `Architecture.router`) gets an
instance-level `forward` that computes the router logits as the model does and routes them with
`actshift.route` under that layer's bank of expert plans; it returns what the model's router
returns, (router_logits, weights, indices), so the experts' dispatch is untouched. `unpatch` puts
the routers' forwards back.

Slots: an `experts=` list is a bank, one entry per request plan, and rows choose their plan with
the same `handle.set_slots(...)` as steering banks: slot s is request plan s for steering and
experts alike (-1: neither). Every token of a row follows its plan, at every position.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import backends, reference
from ..integrations import architectures
from ..ops.route import KINDS
from .plan import ExpertBank, ExpertPlan


def _per_layer(spec, layers: dict[int, torch.nn.Module]) -> list[dict[int, ExpertPlan]]:
    """The spec as one {layer: plan} per slot (a single entry when it is not a bank)."""
    total = max(layers) + 1

    def one(item, where: str) -> dict[int, ExpertPlan]:
        if isinstance(item, ExpertPlan):
            return dict.fromkeys(layers, item)
        if isinstance(item, Mapping):
            out = {}
            for layer, plan in item.items():
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise TypeError(f"experts{where} keys must be layer indices (int), got {layer!r}")
                if not isinstance(plan, ExpertPlan):
                    raise TypeError(f"experts{where}[{layer}] must be an ExpertPlan, got {type(plan).__name__}")
                i = layer % total if -total <= layer < total else layer
                if i not in layers:
                    raise ValueError(f"experts{where} names layer {layer}, which has no MoE router "
                                     f"(MoE layers: {sorted(layers)})")
                out[i] = plan
            return out
        raise TypeError(f"experts{where} must be an ExpertPlan, a {{layer: ExpertPlan}} mapping, or a list of them "
                        f"(a bank selected by handle.set_slots); got {type(item).__name__}")

    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        if not spec:
            raise ValueError("experts as a bank must hold at least one plan")
        return [one(item, f"[{s}]") for s, item in enumerate(spec)]
    return [one(spec, "")]


class _Routed:
    """One router's prepared call: the bank on the device, the op, the router's constants."""

    def __init__(self, gate: torch.nn.Module, spec: architectures.Router, bank: ExpertBank, index: int):
        self.gate, self.bank, self.index = gate, bank, index
        self.k = int(gate.top_k)
        self.kind = KINDS[spec.kind]
        self.renorm = spec.renorm if isinstance(spec.renorm, bool) else bool(getattr(gate, spec.renorm))
        self.cast = spec.weights_dtype == "logits"
        self.fp32 = spec.logits_fp32
        self.bias = getattr(gate, spec.bias) if spec.bias else None
        self.n_group = int(getattr(gate, spec.n_group)) if spec.n_group else 1
        self.topk_group = int(getattr(gate, spec.topk_group)) if spec.topk_group else 1
        self.scale = float(getattr(gate, spec.scale)) if spec.scale else 1.0
        bank.check_k(self.k, f"layer {index}")
        self._op: tuple | None = None  # (device, process-wide backend, op)

    def op(self, device: torch.device, backend: str):
        last, chosen = self._op, backends.get_backend()
        if last is not None and last[0] == device and last[1] == chosen:
            return last[2]
        name = backends.resolve(backend, device)
        if name == "reference":
            fn = reference.route
        elif name == "triton":
            from ..ops._sparse import triton_op

            fn = triton_op("route")
        else:
            fn = torch.ops.actshift.route
        self._op = (device, chosen, fn)
        return fn


def _slot_rows(handle, rows: int, device: torch.device, size: int) -> torch.Tensor:
    """The per-row plan index [rows] of this forward (batch rows repeated over the sequence),
    built once per forward and device."""
    key = ("experts", rows, device)
    cached = handle._row_cache.get(key)
    if cached is not None:
        return cached
    slots = handle._slots
    if slots is None:
        raise ValueError("experts= holds a bank of plans: call handle.set_slots(tensor [batch]) first")
    batch = slots.shape[0]
    if batch == 0 or rows % batch:
        raise ValueError(f"slots hold {batch} rows but the router sees {rows} tokens (not a multiple)")
    if slots.device.type == "cpu" and slots.numel() and int(slots.max()) >= size:
        raise ValueError(f"slots holds {int(slots.max())}, out of range for the experts bank of {size} plan(s)")
    out = slots.to(device)
    out = out if rows == batch else out.repeat_interleave(rows // batch)
    if not torch.compiler.is_compiling() and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        handle._row_cache[key] = out
    return out


def _routed_forward(r: _Routed, handle, per_row: bool):
    gate = r.gate

    def forward(hidden_states):
        h = hidden_states.reshape(-1, gate.hidden_dim)
        logits = F.linear(h.float(), gate.weight.float()) if r.fp32 else F.linear(h, gate.weight)
        offsets, modes = r.bank.tensors(logits.device)
        slot = _slot_rows(handle, logits.shape[0], logits.device, len(r.bank)) if per_row else None
        fn = r.op(logits.device, handle.backend)
        idx, w = fn(logits, r.k, offsets, modes, slot, r.bias, r.kind, r.renorm, r.n_group, r.topk_group, r.scale)
        return logits, (w.to(logits.dtype) if r.cast else w), idx

    return forward


def patch_experts(model: torch.nn.Module, spec, handle) -> None:
    """Installs routed forwards on the MoE routers (see the module docstring). Validates
    everything before changing the model."""
    arch = architectures.architecture(model)
    if arch.router is None:
        raise ValueError(f"experts: model type {architectures.model_type(model)!r} has no MoE router "
                         f"(MoE types: {', '.join(sorted(t for a in architectures.ARCHITECTURES if a.router for t in a.model_types))})")
    blocks = architectures.blocks(model, arch)
    gates: dict[int, torch.nn.Module] = {}
    for i, block in enumerate(blocks):
        try:
            gates[i] = block.get_submodule(arch.router.path)
        except AttributeError:
            continue  # a dense layer
    if not gates:
        raise ValueError(f"experts: no router at '{arch.router.path}' in any layer of this model")
    slots = _per_layer(spec, gates)
    per_row = isinstance(spec, Sequence)
    routed = []
    for i, gate in gates.items():
        E = int(gate.num_experts)
        plans = [s.get(i) for s in slots]
        if all(p is None for p in plans):
            continue  # no request edits this layer
        for s, p in enumerate(plans):
            if p is not None and p.num_experts != E:
                raise ValueError(f"experts: the plan for layer {i}{f' in slot {s}' if per_row else ''} has "
                                 f"{p.num_experts} experts but the router has {E}")
        bank = ExpertBank([p if p is not None else ExpertPlan.identity(E) for p in plans])
        routed.append(_Routed(gate, arch.router, bank, i))
    for r in routed:
        _install(r.gate, _routed_forward(r, handle, per_row), handle)
    handle.experts = {r.index: r.bank for r in routed}


def _install(module: torch.nn.Module, forward, handle) -> None:
    """An instance-level forward for `module`, undone by `unpatch`."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.__dict__["forward"] = functools.wraps(module.forward)(forward)

    def undo() -> None:
        if had:
            module.__dict__["forward"] = old
        else:
            module.__dict__.pop("forward", None)

    handle.add_undo(undo)
