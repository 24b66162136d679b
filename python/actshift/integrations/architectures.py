"""The one table of supported model architectures.

Each entry says, once per model type, where a transformers model keeps what actshift touches:
its blocks, the attention and MLP sublayers whose outputs are their contributions to the residual
stream, the linears that sparsity swaps (by TEAL site), and the FFN's shape and activation.
Steering (`actshift.patch`), activation extraction, TEAL/CATS swaps, ReLU-sparse FFNs and
relufication all read it; adding an architecture means adding one entry here (plus a row in the
parametrized tests of tests/test_architectures.py).

Paths are dotted attribute paths. `layers` is a suffix of the blocks' ModuleList path relative to
the model (it matches "model.layers" inside LlamaForCausalLM as well as a bare LlamaModel); every
other path is relative to one block.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

# TEAL sites (actshift.sparse): the activation read by a group of linears.
#   qkv      the attention input (q/k/v, or a fused qkv projection)
#   o        the attention output (o_proj / out_proj / c_proj / dense)
#   gate_up  the MLP input (gate and up, or the first FFN linear of a non-gated MLP)
#   down     the MLP intermediate (the input of down_proj / fc2 / c_proj / output dense)
TEAL_SITES = ("qkv", "o", "gate_up", "down")

# Residual-stream sites (steering, extraction): the stream after / before a block, and the
# attention's / MLP's contribution to it.
SITES = ("block_output", "block_input", "attention_output", "mlp_output")


@dataclass(frozen=True)
class Router:
    """Where a Mixture-of-Experts block keeps its router, and how the router routes.

    The router module (a transformers `*TopKRouter`) maps hidden states [rows, d] to
    (router_logits, top-k weights, top-k indices) with `weight` [E, d], `top_k` and `num_experts`;
    `actshift.patch(model, experts=...)` replaces its routing with `actshift.route`.

    Attributes:
        path: the router inside a block; layers without it are dense (Qwen2-MoE's mlp_only_layers,
            DeepSeek-V3's first_k_dense_replace) and are left alone.
        kind: "softmax_topk" or "sigmoid_group_topk" (actshift.route's `kind`).
        renorm: whether the picked weights are renormalised: a bool, or the router attribute that
            holds it ("norm_topk_prob").
        weights_dtype: "float32" (the router returns fp32 weights) or "logits" (cast to the
            router logits' dtype).
        logits_fp32: the router computes its logits in fp32 (DeepSeek-V3).
        bias, n_group, topk_group, scale: router attributes of the sigmoid kind (correction bias,
            group counts, routed scaling factor); None where the kind has none.
    """

    path: str = "mlp.gate"
    kind: str = "softmax_topk"
    renorm: bool | str = "norm_topk_prob"
    weights_dtype: str = "logits"
    logits_fp32: bool = False
    bias: str | None = None
    n_group: str | None = None
    topk_group: str | None = None
    scale: str | None = None


@dataclass(frozen=True)
class Architecture:
    """Where one family of model types keeps its parts (see the module docstring).

    Attributes:
        name: the family name ("llama" covers Llama, Mistral, Qwen2 and Qwen3).
        model_types: the transformers `config.model_type` values it describes.
        layers: suffix of the ModuleList of blocks.
        attention: the module inside a block whose output is the attention's contribution, before
            it joins the residual stream and before any post-norm.
        mlp: likewise for the MLP; None where the block has no MLP module (OPT's fc1/fc2 sit in
            the block itself), so the "mlp_output" site is unavailable.
        linears: TEAL site -> the linears reading that activation; empty: no sparsity support.
        ffn: "gated" (down(act(gate x) * up x) with separate gate/up/down linears), "plain"
            (second(act(first x))) or None (fused or unusual FFNs: no FFN swaps).
        ffn_linears: ("mlp path", gate, up, down) for "gated" (paths inside the block; the MLP
            module is swapped whole), (first, second) for "plain".
        act: the FFN activation module inside a block (relufication, ReLU-sparse FFNs).
        vllm: how vLLM's decoder layer of this family hands on the residual stream, for the vLLM
            plugin (actshift.integrations.vllm); None: not supported there. "hidden_residual":
            the layer returns (hidden, residual) and the next layer's fused add-RMSNorm forms the
            stream as hidden + residual (vLLM's Llama, Mistral, Qwen2, Qwen3). Its blocks sit in
            the ModuleList `layers` as in transformers.
        router: the MoE router (expert steering); None for dense models.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    mlp: str | None
    linears: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ffn: str | None = None
    ffn_linears: tuple[str, ...] = ()
    act: str | None = None
    vllm: str | None = None
    router: Router | None = None

    @property
    def sparse(self) -> bool:
        """Whether TEAL sparsity (SparseLinear swaps) is supported."""
        return bool(self.linears)


_LLAMA_LINEARS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
_GATED = dict(ffn="gated", ffn_linears=("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), act="mlp.act_fn")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3"), "layers", "self_attn", "mlp",
                 _LLAMA_LINEARS, **_GATED, vllm="hidden_residual"),
    # Gemma's post-norms follow self_attn / mlp, so those outputs are still the raw contributions.
    Architecture("gemma", ("gemma2", "gemma3_text"), "layers", "self_attn", "mlp"),
    Architecture("phi3", ("phi3",), "layers", "self_attn", "mlp"),
    Architecture("gpt2", ("gpt2",), "h", "attn", "mlp",
                 {"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "gate_up": ("mlp.c_fc",), "down": ("mlp.c_proj",)},
                 ffn="plain", ffn_linears=("mlp.c_fc", "mlp.c_proj"), act="mlp.act"),
    Architecture("gpt_neox", ("gpt_neox",), "layers", "attention", "mlp"),
    # BertSelfOutput / BertOutput fold the residual add and LayerNorm in, so BERT's sublayer
    # contributions are their dense projections.
    Architecture("bert", ("bert",), "encoder.layer", "attention.output.dense", "output.dense",
                 {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
                  "o": ("attention.output.dense",), "gate_up": ("intermediate.dense",), "down": ("output.dense",)},
                 ffn="plain", ffn_linears=("intermediate.dense", "output.dense"), act="intermediate.intermediate_act_fn"),
    Architecture("opt", ("opt",), "decoder.layers", "self_attn", None,
                 {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.out_proj",),
                  "gate_up": ("fc1",), "down": ("fc2",)},
                 ffn="plain", ffn_linears=("fc1", "fc2"), act="activation_fn"),
    # Mixture-of-Experts models: the MLP is the sparse MoE block (with its shared experts, where
    # the family has them); `router` says where its gate is and how it routes.
    Architecture("mixtral", ("mixtral",), "layers", "self_attn", "mlp",
                 router=Router(renorm=True, weights_dtype="float32")),
    Architecture("qwen_moe", ("qwen2_moe", "qwen3_moe", "olmoe"), "layers", "self_attn", "mlp", router=Router()),
    Architecture("deepseek_v3", ("deepseek_v3",), "layers", "self_attn", "mlp",
                 router=Router(kind="sigmoid_group_topk", weights_dtype="float32", logits_fp32=True,
                               bias="e_score_correction_bias", n_group="num_group", topk_group="topk_group",
                               scale="routed_scaling_factor")),
)

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}


def model_type(model: nn.Module) -> str:
    """`model.config.model_type`; ValueError naming `model` when it has none (not a transformers model)."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if not isinstance(mt, str):
        raise ValueError(f"model must be a transformers PreTrainedModel with a config.model_type, got {type(model).__name__}")
    return mt


def architecture(model: nn.Module) -> Architecture:
    """The entry for `model`; ValueError naming the model type and the supported ones otherwise."""
    mt = model_type(model)
    arch = BY_MODEL_TYPE.get(mt)
    if arch is None:
        raise ValueError(f"model type {mt!r} is not supported; supported: {', '.join(sorted(BY_MODEL_TYPE))}")
    return arch


def blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The model's ModuleList of decoder (or encoder) blocks."""
    arch = arch or architecture(model)
    suffix = "." + arch.layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == arch.layers or name.endswith(suffix)):
            return module
    raise ValueError(f"model: no ModuleList '{arch.layers}' found in this {model_type(model)} model")


def submodule(block: nn.Module, path: str, what: str, index: int) -> nn.Module:
    """`block.get_submodule(path)`, with a ValueError that says which layer lacks what."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ValueError(f"model: layer {index} ({type(block).__name__}) has no {what} at '{path}' "
                         "(already swapped by another patch?)") from None


def site_module(arch: Architecture, block: nn.Module, site: str, index: int) -> nn.Module:
    """The module of one block whose output (input, for "block_input") is `site`."""
    if site in ("block_output", "block_input"):
        return block
    path = arch.attention if site == "attention_output" else arch.mlp
    if path is None:
        raise ValueError(f"site: {arch.name} blocks have no separate {site.removesuffix('_output')} module")
    return submodule(block, path, site, index)


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width from the model's config."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"model: cannot read the hidden size from the config of {type(model).__name__}")
