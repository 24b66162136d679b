"""End-to-end decode benchmark of the sparse module swaps on a random-weight Llama-shaped decoder.

One provider call is one decode step at batch 1 after a fixed prompt (the KV cache is cropped back
after every step, so each call sees the same context); tokens/s = 1e6 / median_us. Cases:
  teal s=0.5     actshift.sparse.patch_sparsity with thresholds calibrated (on random token ids)
                 to 50% on all seven linears, vs the same model unpatched ("eager").
  fatrelu s=0.9  the model relufied with FATReLU, thresholds calibrated to 90% FFN sparsity,
                 patch_ffn("relu_sparse") vs the same relufied model unpatched.
The ideal speedup is bytes read per step, dense / sparse: every linear weight (TEAL: times the
active share; FATReLU: gate dense, up and down times the active share) plus the part sparsity
leaves unchanged (lm_head, embedding row, norms, the KV cache). The note column gives the
sparsity measured on held-out random tokens, which the ideal uses.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch

from .harness import EAGER, Case, our_backends

VOCAB = 1024


def config(quick: bool) -> dict:
    """TinyLlama-like widths (hidden 2048, intermediate 5632, 4 layers); --quick: half of each."""
    if quick:
        return dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                    num_key_value_heads=4, prompt=16)
    return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                num_key_value_heads=4, prompt=64)


def build(cfg: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, **{k: v for k, v in cfg.items() if k != "prompt"})
    return LlamaForCausalLM(c).to(device).eval()


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` sharing its parameters (patches swap modules per instance)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def decode_step(model, prompt: torch.Tensor):
    """A provider: one cached decode step after `prompt`, cache cropped back afterwards."""
    from transformers import DynamicCache

    from actshift.integrations.transformers import cache_keyword

    cache = DynamicCache(config=model.config)
    kw = {cache_keyword(model): cache}  # "cache" from transformers 5.24 on
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **kw)
    token = prompt[:, -1:]

    def step():
        with torch.no_grad():
            out = model(input_ids=token, use_cache=True, **kw)
        cache.crop(-1)
        return out.logits

    return step


def _bytes(cfg: dict, dtype: torch.dtype) -> dict[str, int]:
    es = torch.tensor([], dtype=dtype).element_size()
    d, ffn, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    attn = n * (2 * d * d + 2 * d * kv) * es
    mlp = n * 3 * d * ffn * es
    other = (VOCAB * d + d + (2 * n + 1) * d) * es + n * 2 * kv * (cfg["prompt"] + 1) * es  # head, row, norms, KV
    return {"attn": attn, "mlp": mlp, "other": other}


def cases(device: str, quick: bool) -> Iterator[Case]:
    from actshift import sparse

    cfg = config(quick)
    dtype = torch.float32
    backends = [b for b in our_backends(device) if not (b == "triton" and device == "cpu")]
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, 64), generator=gen).to(device) for _ in range(2)]
    held_out = [torch.randint(0, VOCAB, (2, 64), generator=gen).to(device)]
    prompt = torch.randint(0, VOCAB, (1, cfg["prompt"]), generator=gen).to(device)
    shape = f"d={cfg['hidden_size']} ffn={cfg['intermediate_size']} L={cfg['num_hidden_layers']} ctx={cfg['prompt']}"
    b = _bytes(cfg, dtype)
    dense_bytes = b["attn"] + b["mlp"] + b["other"]

    model = build(cfg, device)
    thr = sparse.calibrate(model, calib, 0.5, progress=False)
    s = sparse.realized_sparsity(model, thr, held_out).mean
    providers = {EAGER: decode_step(model, prompt)}
    for be in backends:
        patched = shared_copy(model)
        sparse.patch_sparsity(patched, thr, backend=be)
        providers[f"actshift-{be}"] = decode_step(patched, prompt)
    yield Case("sparse_decode", "teal s=0.5", shape, dtype, providers,
               bytes_actshift=round((b["attn"] + b["mlp"]) * (1 - s) + b["other"]), bytes_eager=dense_bytes,
               note=f"held-out sparsity {s:.3f}, all 7 linears")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relufy warns that it is lossy: intended here
        sparse.relufy(model, "fatrelu")
    sparse.calibrate_fatrelu(model, calib, 0.9, progress=False)
    s = sparse.sparsity_report(model, held_out).mean
    providers = {EAGER: decode_step(model, prompt)}
    for be in backends:
        patched = shared_copy(model)
        sparse.patch_ffn(patched, "relu_sparse", backend=be)
        providers[f"actshift-{be}"] = decode_step(patched, prompt)
    yield Case("sparse_decode", "fatrelu s=0.9", shape, dtype, providers,
               bytes_actshift=round(b["attn"] + b["mlp"] / 3 * (1 + 2 * (1 - s)) + b["other"]), bytes_eager=dense_bytes,
               note=f"held-out FFN sparsity {s:.3f}")
