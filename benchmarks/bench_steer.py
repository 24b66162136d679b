"""Benchmark cases of the `steer` op against what a user writes instead.

Cases (all memory bound; bytes count reads and writes of [rows, d] activations, the small vector
bank stays in cache and is not counted):
  add                one plan, two vectors. The eager hook adds a precomputed λ·Σ w_j v_j:
                     one pass, as cheap as ours, so the ideal speedup is 1.
  add+gate+slot      a bank of 4 plans, a per-row gate and per-row slots (-1 = untouched), as a
                     batch of requests with different steering needs. The eager hook gathers the
                     rows' vectors, scales them by gate and mask, and adds: 6 passes vs our 2.
  ... inplace        the same, writing into x (out=x), as a residual-stream hook does; compared
                     with eager `x.add_(...)` and with `out.copy_(x)`, the bandwidth floor.
  program            the full program of one plan: 2 monitors, a cosine condition, 1 ablation
                     direction, 2 add vectors (rows = 1, 8, 256, 4096 at d = 4096). The eager hook
                     is the composition of separate torch ops (18 passes over [rows, d]: 4 read-outs,
                     ablate, add, mix); ours reads x once and writes y once.
  program inpl       the same, writing into x (out=x); rows the condition leaves alone are not
                     written at all.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

import actshift
from actshift.steering.plan import as_bank

from .harness import COMPILE, COPY, EAGER, Case, compiled, dtypes, our_backends

NUM_PLANS = 4
PROGRAM_ROWS = (1, 8, 256, 4096)
PROGRAM_D = 4096


def shapes(quick: bool) -> list[tuple[int, int]]:
    rows = (1, 256, 4096) if quick else (1, 8, 64, 256, 4096)
    dims = (4096,) if quick else (4096, 8192)
    return [(r, d) for d in dims for r in rows]


def cases(device: str, quick: bool) -> Iterator[Case]:
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes(device, quick):
        es = torch.tensor([], dtype=dtype).element_size()
        for rows, d in shapes(quick):
            shape = f"rows={rows} d={d}"
            x = torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype)
            out = torch.empty_like(x)
            vecs = 0.01 * torch.randn(NUM_PLANS, 2, d, generator=gen)
            plans = [actshift.SteeringPlan(add=vecs[i], weights=[1.0, -0.5], strength=2.0) for i in range(NUM_PLANS)]
            bank = actshift.SteeringBank(plans)
            # What a hook author precomputes: each plan's combined vector, in the model's dtype.
            combined = torch.stack([2.0 * (v[0] - 0.5 * v[1]) for v in vecs]).to(device=device, dtype=dtype)
            gate = torch.rand(rows, generator=gen).to(device)
            slot = torch.randint(-1, NUM_PLANS, (rows,), generator=gen).to(device)
            bank.tensors(x.device)  # build the device copy outside the timed region
            act = rows * d * es

            def add_eager(x=x, v=combined[0]):
                return x + v

            providers = {EAGER: add_eager, COMPILE: compiled(add_eager), COPY: lambda: out.copy_(x)}
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b: actshift.steer(x, plans[0], backend=b)
            yield Case("steer", "add", shape, dtype, providers, bytes_actshift=2 * act, bytes_eager=2 * act, bytes_copy=2 * act)

            def gated_delta(x=x, gate=gate, slot=slot):
                scale = (gate * (slot >= 0)).to(x.dtype)
                return combined[slot.clamp(min=0)] * scale[:, None]

            def slot_eager():
                return x + gated_delta()

            providers = {EAGER: slot_eager, COMPILE: compiled(slot_eager), COPY: lambda: out.copy_(x)}
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b: actshift.steer(x, bank, slot=slot, gate=gate, backend=b)
            yield Case("steer", "add+gate+slot", shape, dtype, providers, bytes_actshift=2 * act, bytes_eager=6 * act, bytes_copy=2 * act)

            # In place: x drifts by 0.01-sized steps per call, harmless over the timed repetitions.
            def inplace_eager():
                return x.add_(gated_delta())

            providers = {EAGER: inplace_eager, COMPILE: compiled(inplace_eager), COPY: lambda: out.copy_(x)}
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b: actshift.steer(x, bank, slot=slot, gate=gate, out=x, backend=b)
            yield Case("steer", "gate+slot inpl", shape, dtype, providers, bytes_actshift=2 * act, bytes_eager=6 * act, bytes_copy=2 * act)
    yield from program_cases(device, quick)


def program_cases(device: str, quick: bool = False) -> Iterator[Case]:
    """The full program (see the module docstring) against its eager hook composition."""
    gen = torch.Generator().manual_seed(1)
    d = PROGRAM_D
    for dtype in dtypes(device, quick):
        es = torch.tensor([], dtype=dtype).element_size()
        u = torch.randn(d, generator=gen)
        u /= u.norm()
        c = torch.randn(d, generator=gen)
        vecs, M = 0.01 * torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen)
        plan = (actshift.SteeringPlan(add=vecs, weights=[1.0, -0.5], strength=2.0)
                .ablate(u).condition(c, threshold=0.0).monitor(M))
        # What a hook author precomputes, in the model's dtype.
        ud, cd, Md = (t.to(device=device, dtype=dtype) for t in (u, c / c.norm(), M))
        vsum = (vecs[0] - 0.5 * vecs[1]).to(device=device, dtype=dtype)
        as_bank(plan).program(torch.device(device))  # build the device copy outside the timed region
        for rows in PROGRAM_ROWS:
            x = torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype)
            out = torch.empty_like(x)
            act = rows * d * es

            def program_eager(x=x):
                mon = x @ Md.t()
                gate = ((x @ cd) / x.norm(dim=-1) > 0).to(x.dtype)
                z = x - (x @ ud)[:, None] * ud
                z = z + vsum
                return x + (2.0 * gate)[:, None] * (z - x), mon

            providers = {EAGER: program_eager, COMPILE: compiled(program_eager), COPY: lambda out=out, x=x: out.copy_(x)}
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b, x=x: actshift.steer(x, plan, return_monitors=True, backend=b)
            yield Case("steer", "program", f"rows={rows} d={d}", dtype, providers,
                       bytes_actshift=2 * act, bytes_eager=18 * act, bytes_copy=2 * act)

            # In place (out=x), against the hook that adds its delta into x; x drifts by 0.01-sized
            # steps per call (ablation is idempotent), harmless over the timed repetitions.
            def program_inplace_eager(x=x):
                mon = x @ Md.t()
                gate = ((x @ cd) / x.norm(dim=-1) > 0).to(x.dtype)
                z = x - (x @ ud)[:, None] * ud
                z = z + vsum
                return x.add_((2.0 * gate)[:, None] * (z - x)), mon

            providers = {EAGER: program_inplace_eager, COMPILE: compiled(program_inplace_eager),
                         COPY: lambda out=out, x=x: out.copy_(x)}
            for b in our_backends(device):
                providers[f"actshift-{b}"] = lambda b=b, x=x: actshift.steer(x, plan, out=x, return_monitors=True, backend=b)
            yield Case("steer", "program inpl", f"rows={rows} d={d}", dtype, providers,
                       bytes_actshift=2 * act, bytes_eager=18 * act, bytes_copy=2 * act)
