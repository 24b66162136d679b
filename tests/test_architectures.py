"""The architecture table (actshift.integrations.architectures) against each real transformers model.

One row per supported model type: a tiny random model, and the facts its entry claims checked
independently of the table, by running the model: the blocks are the expected ModuleList, the
attention and MLP modules' outputs add up to the residual stream (their outputs ARE the sublayer
contributions), the sparse linears read the right widths, the FFN activation is the module the
FFN applies. A new entry without a row here fails `test_every_entry_has_a_test_row`.
"""
import pytest
import torch

from actshift.integrations import architectures as A
from moe_models import CONFIGS as MOE_CONFIGS

T = pytest.importorskip("transformers")

D, FFN = 32, 64
DECODER = dict(vocab_size=100, hidden_size=D, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model type -> (config, the blocks' full path, residual form): "pre" = x + attn + mlp in sequence,
# "parallel" = x + attn(x) + mlp(x), "post" = norms after the sublayers (no additive identity).
ROWS = {
    "llama": (lambda: T.LlamaConfig(**DECODER), "model.layers", "pre"),
    "mistral": (lambda: T.MistralConfig(**DECODER), "model.layers", "pre"),
    "qwen2": (lambda: T.Qwen2Config(**DECODER), "model.layers", "pre"),
    "qwen3": (lambda: T.Qwen3Config(**DECODER), "model.layers", "pre"),
    "gemma2": (lambda: T.Gemma2Config(**DECODER), "model.layers", "post"),
    "gemma3_text": (lambda: T.Gemma3TextConfig(**DECODER), "model.layers", "post"),
    "phi3": (lambda: T.Phi3Config(**DECODER), "model.layers", "pre"),
    "gpt2": (lambda: T.GPT2Config(vocab_size=100, n_embd=D, n_inner=FFN, n_layer=2, n_head=4), "transformer.h", "pre"),
    "gpt_neox": (lambda: T.GPTNeoXConfig(vocab_size=100, hidden_size=D, intermediate_size=FFN, num_hidden_layers=2,
                                         num_attention_heads=4), "gpt_neox.layers", "parallel"),
    "bert": (lambda: T.BertConfig(vocab_size=100, hidden_size=D, intermediate_size=FFN, num_hidden_layers=2,
                                  num_attention_heads=4), "encoder.layer", "post"),
    "opt": (lambda: T.OPTConfig(vocab_size=100, hidden_size=D, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=D), "model.decoder.layers", "pre"),
}
ROWS.update({t: (config, "model.layers", "pre") for t, config in MOE_CONFIGS.items()})  # MoE: mlp = the MoE block


def tiny(model_type):
    torch.manual_seed(0)
    config = ROWS[model_type][0]()
    model = T.BertModel(config) if model_type == "bert" else T.AutoModelForCausalLM.from_config(config)
    return model.eval()


def test_every_entry_has_a_test_row():
    assert set(A.BY_MODEL_TYPE) == set(ROWS)
    assert len(A.BY_MODEL_TYPE) == sum(len(a.model_types) for a in A.ARCHITECTURES)  # no type listed twice


@pytest.mark.parametrize("model_type", list(ROWS))
def test_entry_matches_the_model(model_type):
    model = tiny(model_type)
    arch = A.architecture(model)
    assert model_type in arch.model_types
    blocks = A.blocks(model)
    assert blocks is model.get_submodule(ROWS[model_type][1])
    assert A.hidden_size(model) == D

    # Run layer 1 and capture the block's input and output and each sublayer's output.
    seen = {}

    def keep(name, pre=False):
        def hook(module, args, kwargs, out=None):
            value = (kwargs.get("hidden_states", args[0] if args else None) if pre else out)
            seen[name] = (value[0] if isinstance(value, tuple) else value).detach()
        return hook

    block = blocks[1]
    hooks = [block.register_forward_pre_hook(keep("in", pre=True), with_kwargs=True),
             block.register_forward_hook(lambda m, a, k, o: keep("out")(m, a, k, o), with_kwargs=True)]
    for site in ("attention_output", "mlp_output"):
        if site == "mlp_output" and arch.mlp is None:
            with pytest.raises(ValueError, match="no separate mlp"):
                A.site_module(arch, block, site, 1)
            module = block.get_submodule(arch.ffn_linears[1])  # OPT: the MLP's contribution is fc2's output
        else:
            module = A.site_module(arch, block, site, 1)
        hooks.append(module.register_forward_hook(lambda m, a, k, o, s=site: keep(s)(m, a, k, o), with_kwargs=True))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    attn, mlp = (seen[s].reshape(seen["in"].shape) for s in ("attention_output", "mlp_output"))  # OPT's FFN is 2-D
    if ROWS[model_type][2] in ("pre", "parallel"):  # the sublayer outputs are the contributions
        torch.testing.assert_close(seen["in"] + attn + mlp, seen["out"], rtol=1e-5, atol=1e-5)

    # Sparse linears: nn.Linear / Conv1D reading d (qkv, o, gate_up) or the FFN width (down).
    for site, paths in arch.linears.items():
        assert site in A.TEAL_SITES and paths
        for path in paths:
            w, n_in, _ = _linear(block.get_submodule(path))
            assert n_in == (FFN if site == "down" else D), (site, path)
    # The FFN entry: the activation module is what the FFN applies between its linears.
    x = torch.randn(2, D)
    with torch.no_grad():
        if arch.ffn == "gated":
            mlp, gate, up, down = (block.get_submodule(p) for p in arch.ffn_linears)
            act = block.get_submodule(arch.act)
            torch.testing.assert_close(down(act(gate(x)) * up(x)), mlp(x), rtol=1e-5, atol=1e-6)
        elif arch.ffn == "plain":
            first, second = (block.get_submodule(p) for p in arch.ffn_linears)
            act = block.get_submodule(arch.act)
            torch.testing.assert_close(second(act(first(x))), _ffn_reference(block, arch, x), rtol=1e-5, atol=1e-6)
        else:
            assert arch.ffn is None and not arch.ffn_linears
    # The router entry: the gate maps [rows, D] to (logits [rows, E], weights, indices [rows, top_k]).
    if arch.router is not None:
        gate = block.get_submodule(arch.router.path)
        logits, w, idx = gate(x)
        assert logits.shape == (2, gate.num_experts) and idx.shape == w.shape == (2, gate.top_k)
        assert (w.dtype == torch.float32) == (arch.router.weights_dtype == "float32" or logits.dtype == torch.float32)
        for attr in (arch.router.renorm, arch.router.bias, arch.router.n_group, arch.router.topk_group,
                     arch.router.scale):
            assert attr is None or isinstance(attr, bool) or hasattr(gate, attr), attr


def _linear(module):
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.in_features, module.out_features
    assert type(module).__name__ == "Conv1D"
    return module.weight, module.weight.shape[0], module.weight.shape[1]


def _ffn_reference(block, arch, x):
    """The plain FFN as the model runs it: MLP module where there is one, else fc2(act(fc1 x))."""
    if arch.name == "gpt2":
        return block.mlp(x)  # dropout is off in eval
    if arch.name == "bert":
        return block.output.dense(block.intermediate(x))
    return block.fc2(block.activation_fn(block.fc1(x)))


def test_unsupported_model_type_names_the_supported_ones():
    model = T.LlamaForCausalLM(T.LlamaConfig(**DECODER))
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match="'mamba' is not supported; supported: .*llama"):
        A.architecture(model)
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
        A.architecture(torch.nn.Linear(2, 2))
