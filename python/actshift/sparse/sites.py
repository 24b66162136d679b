"""The sparse layer's view of the architecture table (actshift.integrations.architectures).

A *site* is one activation that feeds one or more linears: TEAL sparsifies the input of every
linear, and linears that read the same activation share a site (and so a threshold):
  qkv      the attention input (q/k/v, or GPT-2's fused c_attn)
  o        the attention output (o_proj / out_proj / c_proj / BERT's attention output dense)
  gate_up  the MLP input (gate and up, or the first FFN linear of a non-gated MLP)
  down     the MLP intermediate (the input of down_proj / fc2 / c_proj / BERT's output dense)
CATS uses one site per layer, `cats`: |act(gate)| of a gated MLP (the MLP is swapped whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..integrations.architectures import ARCHITECTURES, TEAL_SITES, Architecture, architecture, blocks, model_type

CATS_SITE = "cats"


@dataclass
class Layer:
    """One transformer block: its index, the module, and its architecture entry."""

    index: int
    module: nn.Module
    arch: Architecture

    def linears(self, site: str) -> list[tuple[str, nn.Module]]:
        """(path inside the layer, module) of the linears reading `site`."""
        return [(p, self.module.get_submodule(p)) for p in self.arch.linears[site]]

    def mlp(self) -> nn.Module:
        """The gated MLP module (gated FFNs only)."""
        return self.module.get_submodule(self.arch.ffn_linears[0])


def family(model: nn.Module) -> Architecture:
    """The architecture entry of a transformers model with sparsity support; ValueError naming
    `model` otherwise."""
    arch = architecture(model)
    if not arch.sparse:
        supported = sorted(t for a in ARCHITECTURES if a.sparse for t in a.model_types)
        raise ValueError(f"model: unsupported architecture {model_type(model)!r} for sparsity "
                         f"(supported model_type: {', '.join(supported)})")
    return arch


def layers(model: nn.Module) -> list[Layer]:
    """The model's transformer blocks in order."""
    arch = family(model)
    return [Layer(i, block, arch) for i, block in enumerate(blocks(model, arch))]


def linear_weight_t(module: nn.Module) -> tuple[torch.Tensor, int, int]:
    """(weight as [in, out], in, out) of an nn.Linear or a transformers Conv1D (already [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.t(), module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight, module.weight.shape[0], module.weight.shape[1]
    raise ValueError(f"model: cannot sparsify a {type(module).__name__} (nn.Linear or transformers Conv1D only)")


def site_params(layer: Layer, site: str) -> int:
    """Weight parameters that read `site` (the greedy allocation weights sites by them)."""
    return sum(linear_weight_t(m)[0].numel() for _, m in layer.linears(site))


def check_sites(sites, arch: Architecture) -> tuple[str, ...]:
    """The requested sites as a tuple: a subset of TEAL_SITES, or "cats" (gated FFNs only)."""
    if isinstance(sites, str):
        sites = (sites,)
    try:
        sites = tuple(sites)
    except TypeError:
        raise TypeError(f"sites must be a sequence of site names or 'cats', got {sites!r}") from None
    if sites == (CATS_SITE,):
        if arch.ffn != "gated":
            raise ValueError(f"sites='cats' needs a gated MLP (Llama/Mistral/Qwen), not a {arch.name} model")
        return sites
    bad = [s for s in sites if s not in TEAL_SITES]
    if bad or not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct names from {TEAL_SITES} or 'cats', got {sites!r}")
    return sites
