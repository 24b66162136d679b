"""Expert-steering recipes.

`attribute_experts` is MoTE's functional token resonance imaging: per MoE layer and expert, how
often the router selects the expert (and with what mean routing weight) on prompts that elicit a
behaviour against neutral prompts, ranked by the difference in selection frequency. Its `plan`
switches the top n experts off (MoTE's refusal experts) or forces them on.

`offset_plan` turns router-logit vectors supplied per layer (e.g. Rewiring Experts' additive
router vectors) into ExpertPlans.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..integrations import architectures
from .plan import ExpertPlan


@dataclass
class ExpertStats:
    """Routing statistics of one prompt set: per layer, selections [E] and summed weights [E]
    over `tokens` routed tokens."""

    counts: dict[int, torch.Tensor]
    weights: dict[int, torch.Tensor]
    tokens: int

    def frequency(self, layer: int) -> torch.Tensor:
        return self.counts[layer].double() / max(self.tokens, 1)

    def mean_weight(self, layer: int) -> torch.Tensor:
        return self.weights[layer].double() / max(self.tokens, 1)


@dataclass
class Attribution:
    """The ranked table of `attribute_experts`: rows (layer, expert, frequency on behaviour,
    frequency on neutral, their difference, mean weight on behaviour, mean weight on neutral),
    largest difference first."""

    rows: list[tuple[int, int, float, float, float, float, float]]
    num_experts: dict[int, int]
    top_k: dict[int, int]

    def plan(self, n: int, mode: str = "off", layers=None) -> dict[int, ExpertPlan]:
        """{layer: ExpertPlan} switching off (mode "off") or forcing on ("on") the top n experts
        (of `layers`, when given). Forcing keeps at most k experts per layer and switching off
        leaves at least k (the router picks k); rows past the limit are skipped."""
        if mode not in ("off", "on"):
            raise ValueError(f"mode must be 'off' or 'on', got {mode!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        chosen: dict[int, list[int]] = {}
        taken = 0
        for layer, expert, *_ in self.rows:
            if taken == n:
                break
            if layers is not None and layer not in layers:
                continue
            picked = chosen.setdefault(layer, [])
            limit = self.top_k[layer] if mode == "on" else self.num_experts[layer] - self.top_k[layer]
            if len(picked) < limit:
                picked.append(expert)
                taken += 1
        return {layer: ExpertPlan(self.num_experts[layer], **{mode: experts}) for layer, experts in chosen.items()}


def _gates(model) -> dict[int, torch.nn.Module]:
    arch = architectures.architecture(model)
    if arch.router is None:
        raise ValueError(f"model: model type {architectures.model_type(model)!r} has no MoE router")
    out = {}
    for i, block in enumerate(architectures.blocks(model, arch)):
        try:
            out[i] = block.get_submodule(arch.router.path)
        except AttributeError:
            continue
    return out


@torch.no_grad()
def routing_stats(model, inputs: Iterable) -> ExpertStats:
    """Counts each MoE router's selections over `inputs`: token-id tensors [batch, seq] or
    mappings with input_ids (and attention_mask, whose padding tokens are not counted)."""
    gates = _gates(model)
    counts = {i: torch.zeros(int(g.num_experts), dtype=torch.long) for i, g in gates.items()}
    weights = {i: torch.zeros(int(g.num_experts), dtype=torch.float64) for i, g in gates.items()}
    state = {"mask": None, "tokens": 0}

    def hook(i):
        def fn(module, args, out):
            _, w, idx = out
            keep = state["mask"]
            idx, w = idx.cpu(), w.detach().double().cpu()
            if keep is not None:
                idx, w = idx[keep], w[keep]
            counts[i] += torch.bincount(idx.reshape(-1), minlength=counts[i].numel())
            weights[i].index_add_(0, idx.reshape(-1), w.reshape(-1))
        return fn

    hooks = [g.register_forward_hook(hook(i)) for i, g in gates.items()]
    was_training = model.training
    model.eval()
    try:
        for item in inputs:
            batch = dict(item) if isinstance(item, Mapping) else {"input_ids": item}
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.reshape(-1).bool().cpu()
            state["tokens"] += ids.numel() if mask is None else int(mask.sum())
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ExpertStats(counts, weights, state["tokens"])


def attribute_experts(model, behaviour: Iterable, neutral: Iterable) -> Attribution:
    """MoTE attribution: selection frequency per (layer, expert) on `behaviour` prompts minus on
    `neutral` prompts, ranked (ties by mean-weight difference, then layer and expert)."""
    b, n = routing_stats(model, behaviour), routing_stats(model, neutral)
    gates = _gates(model)
    rows = []
    for layer in b.counts:
        fb, fn, wb, wn = b.frequency(layer), n.frequency(layer), b.mean_weight(layer), n.mean_weight(layer)
        for e in range(fb.numel()):
            rows.append((layer, e, float(fb[e]), float(fn[e]), float(fb[e] - fn[e]), float(wb[e]), float(wn[e])))
    rows.sort(key=lambda r: (-r[4], -(r[5] - r[6]), r[0], r[1]))
    return Attribution(rows, {i: int(g.num_experts) for i, g in gates.items()}, {i: int(g.top_k) for i, g in gates.items()})


def offset_plan(vectors: Mapping[int, torch.Tensor], strength: float = 1.0) -> dict[int, ExpertPlan]:
    """{layer: router-logit vector [E]} -> {layer: ExpertPlan} adding strength * vector to that
    layer's router logits (for `actshift.patch(model, experts=...)`)."""
    if not isinstance(vectors, Mapping):
        raise TypeError(f"vectors must be a {{layer: tensor [E]}} mapping, got {type(vectors).__name__}")
    out = {}
    for layer, v in vectors.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise ValueError(f"vectors[{layer}] must be a 1-D tensor [E], got {getattr(v, 'shape', type(v).__name__)}")
        out[layer] = ExpertPlan(v.shape[0], offsets=v, strength=strength)
    return out
