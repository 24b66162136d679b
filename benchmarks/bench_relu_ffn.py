"""Benchmark cases of `relu_ffn` (exact ReLU-sparse FFN skipping, ProSparse/TurboSparse style).

A gated FFN reads three [ffn, d] weight matrices; at sparsity s (share of neurons whose gate
activation is 0) an ideal exact kernel reads the whole gate matrix and (1 - s) of the up and down
ones, so the ideal speedup over the dense FFN is 3 / (1 + 2(1 - s)) (the harness's ideal column).
  eager          the dense FFN a model runs: F.linear gate, up, relu(g)·u, F.linear down
  actshift-<b>   actshift.relu_ffn (act "relu") on the same weights (w_down_t = down.weight.t())
Sparsity is exact: gate rows are negated so that precisely round(s·ffn) neurons are inactive for
the first row. Batch rows are that row plus noise (masks of tokens correlate in practice); the
note column reports the union density the kernel actually reads.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import actshift

from .harness import EAGER, Case, dtypes, our_backends

MODELS = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def _weights(d: int, ffn: int, gen: torch.Generator):
    w_gate = torch.randn(ffn, d, generator=gen) / d**0.5
    w_up = torch.randn(ffn, d, generator=gen) / d**0.5
    w_down_t = torch.randn(ffn, d, generator=gen) / ffn**0.5
    return w_gate, w_up, w_down_t


def _case(device, dtype, model, rows, s, w, x0, gen) -> Case:
    w_gate, w_up, w_down_t = w
    d, ffn = x0.shape[-1], w_gate.shape[0]
    # Negate gate rows so that exactly round(s·ffn) neurons are inactive for x0.
    g = w_gate @ x0
    inactive = torch.zeros(ffn, dtype=torch.bool)
    inactive[torch.randperm(ffn, generator=gen)[: round(s * ffn)]] = True
    flip = torch.where(inactive == (g > 0), -1.0, 1.0)
    wg = (w_gate * flip[:, None]).to(device=device, dtype=dtype)
    wu, wdt = w_up.to(device=device, dtype=dtype), w_down_t.to(device=device, dtype=dtype)
    x = (x0 + 0.3 * torch.randn(rows, d, generator=gen) * (torch.arange(rows) > 0)[:, None]).to(device=device, dtype=dtype)
    union = float((x.float() @ wg.float().t() > 0).any(0).float().mean())
    down = wdt.t()  # [d, ffn] view: the dense FFN and ours share the weights

    def eager():
        return F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), down)

    providers = {EAGER: eager}
    for b in our_backends(device):
        providers[f"actshift-{b}"] = lambda b=b: actshift.relu_ffn(x, wg, wu, wdt, "relu", backend=b)
    one = ffn * d * wg.element_size()
    return Case("relu_ffn", f"s={s:g}" if rows == 1 else f"s={s:g} batch", f"{model} rows={rows}", dtype, providers,
                bytes_actshift=round(one * (1 + 2 * union)), bytes_eager=3 * one, note=f"union density {union:.3f}")


def cases(device: str, quick: bool) -> Iterator[Case]:
    gen = torch.Generator().manual_seed(0)
    models = {"llama2-7b": MODELS["llama2-7b"]} if quick else MODELS
    for dtype in dtypes(device, quick):
        for model, (d, ffn) in models.items():
            w = _weights(d, ffn, gen)
            x0 = torch.randn(d, generator=gen)
            for s in (0.9,) if quick else SPARSITIES:
                yield _case(device, dtype, model, 1, s, w, x0, gen)
            if model == "llama2-7b":
                for rows in (2, 4) if quick else (2, 4, 8):
                    yield _case(device, dtype, model, rows, 0.9, w, x0, gen)
