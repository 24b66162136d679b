"""Where the sparsifiable linears of each supported architecture live.

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

TEAL_SITES = ("qkv", "o", "gate_up", "down")
CATS_SITE = "cats"

# model_type -> family; each family lists, per site, the linears' paths inside one layer.
FAMILY_OF = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gpt2": "gpt2", "bert": "bert", "opt": "opt",
}
SITE_PATHS = {
    "llama": {
        "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o": ("self_attn.o_proj",),
        "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
        "down": ("mlp.down_proj",),
    },
    "gpt2": {"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "gate_up": ("mlp.c_fc",), "down": ("mlp.c_proj",)},
    "bert": {
        "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "o": ("attention.output.dense",),
        "gate_up": ("intermediate.dense",),
        "down": ("output.dense",),
    },
    "opt": {
        "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o": ("self_attn.out_proj",),
        "gate_up": ("fc1",),
        "down": ("fc2",),
    },
}


@dataclass
class Layer:
    """One transformer block: its index, the module, and its family's site paths."""

    index: int
    module: nn.Module
    family: str

    def linears(self, site: str) -> list[tuple[str, nn.Module]]:
        """(path inside the layer, module) of the linears reading `site`."""
        return [(p, self.module.get_submodule(p)) for p in SITE_PATHS[self.family][site]]

    def mlp(self) -> nn.Module:
        """The gated MLP module (llama family only)."""
        return self.module.get_submodule("mlp")


def family(model: nn.Module) -> str:
    """The architecture family of a transformers model; ValueError naming `model` otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_OF:
        raise ValueError(
            f"model: unsupported architecture {model_type!r} (supported model_type: {', '.join(sorted(FAMILY_OF))})"
        )
    return FAMILY_OF[model_type]


def layers(model: nn.Module) -> list[Layer]:
    """The model's transformer blocks in order: the first ModuleList whose items hold the attention
    input linears (present whether or not the MLP has been swapped)."""
    fam = family(model)
    paths = SITE_PATHS[fam]["qkv"]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_has(module[0], p) for p in paths):
            return [Layer(i, block, fam) for i, block in enumerate(module)]
    raise ValueError(f"model: found no list of {fam}-style layers holding {', '.join(paths)}")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


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


def check_sites(sites, fam: str) -> tuple[str, ...]:
    """The requested sites as a tuple: a subset of TEAL_SITES, or "cats" (gated llama family only)."""
    if isinstance(sites, str):
        sites = (sites,)
    try:
        sites = tuple(sites)
    except TypeError:
        raise TypeError(f"sites must be a sequence of site names or 'cats', got {sites!r}") from None
    if sites == (CATS_SITE,):
        if fam != "llama":
            raise ValueError(f"sites='cats' needs a gated MLP (Llama/Mistral/Qwen), not a {fam} model")
        return sites
    bad = [s for s in sites if s not in TEAL_SITES]
    if bad or not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct names from {TEAL_SITES} or 'cats', got {sites!r}")
    return sites
