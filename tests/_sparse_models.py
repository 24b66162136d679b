"""Tiny random-weight transformers models for the sparse tests (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 96


def tiny(kind: str, *, act: str | None = None, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A small model of `kind` (llama, mistral, qwen2, qwen3, gpt2, bert, opt) in fp32, eval mode.
    `act` overrides the FFN activation (config hidden_act / activation_function)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=layers)
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[kind]
        cfg = cls[0](intermediate_size=176, num_key_value_heads=2, max_position_embeddings=256,
                     hidden_act=act or "silu", **common)
        if kind == "qwen3":
            cfg.head_dim = 16
        model = cls[1](cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=layers, n_positions=256,
                            activation_function=act or "gelu_new")
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(intermediate_size=176, max_position_embeddings=256, hidden_act=act or "gelu", **common)
        model = tf.BertModel(cfg)
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=layers,
                           ffn_dim=176, max_position_embeddings=256, word_embed_proj_dim=64,
                           activation_function=act or "relu")
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Random init gives tiny weights (std 0.02): scale up so activations spread over a useful range.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def batches(n: int, *, batch: int = 2, seq: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]
