"""Benchmark cases of percentile scaling (ASH/SCALE) and the AdaSCALE statistics.

Baselines, as the papers' reference code and users write them:
  eager          torch.topk composition: s1 = z.sum, top-k values (and indices for ASH), s2, scale
  torch.quantile threshold at the p-th quantile, mask, masked sum (the "peer" column)
  torch.compile  of the topk composition
Ideal speedup: bytes of the topk composition (it reads z three times and writes the top-k values
and indices plus y) over ours (read z, write y). Selection is not purely memory bound on a CPU,
so the ideal is a yardstick, not a bound.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

import actshift

from .harness import COMPILE, COPY, EAGER, Case, compiled, dtypes, our_backends

QUANTILE = "torch.quantile"
PERCENTILE = 85.0  # SCALE's default; ASH-S runs at 90


def shapes(quick: bool) -> list[tuple[int, int]]:
    return [(256, 2048)] if quick else [(256, 2048), (1024, 2048), (64, 8192)]


def _k(d: int, p: float) -> int:
    return d - int(round(d * p / 100))


def scale_topk(z: torch.Tensor, p: float) -> torch.Tensor:
    """SCALE as its reference code computes it (kai422/SCALE, OpenOOD), on pooled features."""
    s1 = z.sum(dim=1, dtype=torch.float32)
    s2 = torch.topk(z, _k(z.shape[1], p), dim=1).values.sum(dim=1, dtype=torch.float32)
    return z * torch.exp(s1 / s2).to(z.dtype)[:, None]


def ash_s_topk(z: torch.Tensor, p: float) -> torch.Tensor:
    """ASH-S as andrijazz/ash computes it (prune to the top k, then scale)."""
    s1 = z.sum(dim=1, dtype=torch.float32)
    v, i = torch.topk(z, _k(z.shape[1], p), dim=1)
    pruned = torch.zeros_like(z).scatter_(1, i, v)
    return pruned * torch.exp(s1 / v.sum(dim=1, dtype=torch.float32)).to(z.dtype)[:, None]


def scale_quantile(z: torch.Tensor, p: float) -> torch.Tensor:
    """SCALE via a quantile threshold (s = exp(Σa / Σ_{a > P_p(a)} a), as oodeel describes it)."""
    zf = z.float()
    t = torch.quantile(zf, p / 100, dim=1, keepdim=True)
    s2 = (zf * (zf >= t)).sum(dim=1)
    return z * torch.exp(zf.sum(dim=1) / s2).to(z.dtype)[:, None]


def ash_s_quantile(z: torch.Tensor, p: float) -> torch.Tensor:
    zf = z.float()
    t = torch.quantile(zf, p / 100, dim=1, keepdim=True)
    pruned = zf * (zf >= t)
    return (pruned * torch.exp(zf.sum(dim=1) / pruned.sum(dim=1))[:, None]).to(z.dtype)


def adascale_eager(z, zt, k1, k2):
    q = (z - zt).abs().gather(1, torch.topk(z, k1, dim=1).indices).sum(dim=1, dtype=torch.float32)
    c_o = zt.gather(1, torch.topk(z, k2, dim=1).indices).clamp(min=0).sum(dim=1, dtype=torch.float32)
    return q, c_o


def cases(device: str, quick: bool) -> Iterator[Case]:
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes(device, quick):
        es = torch.tensor([], dtype=dtype).element_size()
        for n, d in shapes(quick):
            shape = f"N={n} D={d}"
            # Pooled post-ReLU features: non-negative, with exact zeros, like ResNet-50's.
            z = torch.relu(torch.randn(n, d, generator=gen)).to(device=device, dtype=dtype)
            out = torch.empty_like(z)
            act = n * d * es
            for method, p, eager, quant in (("scale", PERCENTILE, scale_topk, scale_quantile),
                                            ("ash_s", 90.0, ash_s_topk, ash_s_quantile)):
                k = _k(d, p)
                topk_bytes = 3 * act + n * k * (es + 8) + act + (act if method == "ash_s" else 0)
                providers = {
                    EAGER: lambda eager=eager, p=p: eager(z, p),
                    QUANTILE: lambda quant=quant, p=p: quant(z, p),
                    COMPILE: compiled(lambda eager=eager, p=p: eager(z, p)),
                    COPY: lambda: out.copy_(z),
                }
                for b in our_backends(device):
                    providers[f"actshift-{b}"] = lambda b=b, method=method, p=p: actshift.percentile_scale(z, p, method, backend=b)
                yield Case("percentile_scale", f"{method}@{p:g}", shape, dtype, providers,
                           bytes_actshift=2 * act, bytes_eager=topk_bytes, peer=QUANTILE, bytes_copy=2 * act)

            zt = (z + 0.05 * torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)).contiguous()
            k1, k2 = max(1, d // 100), max(1, d * 5 // 100)
            providers = {
                EAGER: lambda: adascale_eager(z, zt, k1, k2),
                COMPILE: compiled(lambda: adascale_eager(z, zt, k1, k2)),
            }
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b: actshift.adascale_stats(z, zt, k1, k2, backend=b)
            # eager: two top-k passes over z, the gathers (and |z - z~| over all of z), small outputs.
            yield Case("adascale_stats", "Q,C_o", shape, dtype, providers, bytes_actshift=2 * act, bytes_eager=5 * act)
