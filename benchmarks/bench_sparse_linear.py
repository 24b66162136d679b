"""Benchmark cases of `sparse_linear` (decode-time activation sparsity, TEAL/CATS style).

The op is bound by the weight stream: at batch 1 an ideal kernel reads only the weight rows of
active inputs, (1 - s) of the weights, so the ideal speedup over a dense product is 1/(1 - s)
(the harness's ideal column; x and y are a rounding error at these shapes). Providers:
  eager          what a user writes: threshold, then F.linear on the same weights (reads all)
  dense          F.linear on x without threshold (the peer: the layer we replace)
  actshift-<b>   actshift.sparse_linear on weight_t = weight.t() (every provider shares storage)
Batches 2..16 read each active weight row once for all rows, so the ideal follows the density of
the union of the rows' active sets. With independent random masks at s = 0.5 the union is
1 - 0.5^rows dense (0.75, 0.94, 1.00, 1.00): the note column reports it.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import actshift

from .harness import EAGER, Case, dtypes, our_backends

DENSE = "dense"
THRESHOLD = 1.0
SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (8192, 28672)]  # (in, out): Llama-2-7B up/down, attn, 70B up
SPARSITIES = (0.25, 0.5, 0.75, 0.9)


def activations(rows: int, n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """x [rows, n] with exactly round(sparsity·n) entries of |x| <= THRESHOLD per row, at random
    positions drawn independently per row."""
    x = torch.randn(rows, n, generator=gen)
    big = torch.sign(x) * (THRESHOLD + 0.1 + x.abs())
    small = x.clamp(-THRESHOLD * 0.9, THRESHOLD * 0.9)
    k = round(sparsity * n)
    order = torch.rand(rows, n, generator=gen).argsort(dim=1)
    inactive = torch.zeros(rows, n, dtype=torch.bool).scatter_(1, order[:, :k], True)
    return torch.where(inactive, small, big)


def _case(device, dtype, rows, n, out, sparsity, weight_t, gen, label) -> Case:
    x = activations(rows, n, sparsity, gen).to(device=device, dtype=dtype)
    union = float((x.abs() > THRESHOLD).any(0).float().mean())
    weight = weight_t.t()  # [out, in] view of the same storage: F.linear reads it transposed

    def eager():
        return F.linear(torch.where(x.abs() > THRESHOLD, x, 0), weight)

    providers = {EAGER: eager, DENSE: lambda: F.linear(x, weight)}
    for b in our_backends(device):
        providers[f"actshift-{b}"] = lambda b=b: actshift.sparse_linear(x, weight_t, THRESHOLD, backend=b)
    w_bytes = weight_t.numel() * weight_t.element_size()
    return Case("sparse_linear", label, f"rows={rows} {n}->{out}", dtype, providers,
                bytes_actshift=max(1, round(union * w_bytes)), bytes_eager=w_bytes,
                note=f"union density {union:.3f}", peer=DENSE)


def cases(device: str, quick: bool) -> Iterator[Case]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4096, 4096)] if quick else SHAPES
    sparsities = (0.5, 0.9) if quick else SPARSITIES
    for dtype in dtypes(device, quick):
        for n, out in shapes:
            weight_t = (torch.randn(n, out, generator=gen) / n**0.5).to(device=device, dtype=dtype)
            for s in sparsities:
                yield _case(device, dtype, 1, n, out, s, weight_t, gen, f"s={s:g}")
            if (n, out) == (4096, 11008) or quick:  # the batch table, random masks per row
                for rows in (2, 4) if quick else (2, 4, 8, 16):
                    yield _case(device, dtype, rows, n, out, 0.5, weight_t, gen, "s=0.5 batch")
            del weight_t
