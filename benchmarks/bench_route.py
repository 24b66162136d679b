"""Benchmark cases of `route` (MoE routing with expert edits) and decode with expert steering.

Router op, at decode and prefill row counts, E = 8, 64, 128, 256 and k = 2, 8, with a plan that
adds logit offsets, switches two experts off and forces one on. Providers:
  eager          what a user writes: float + offsets, masked_fill(-inf) for off experts, softmax,
                 a +inf key for forced ones, topk, gather, renormalise
  torch.compile  the same composition compiled
  actshift-<b>   actshift.route with the plan
Bytes: the fused op reads the logits once and writes indices and weights; the eager composition
materialises the fp32 logits, the masked logits, the probabilities and the keys (about 5 passes
over [rows, E] fp32), which is the ideal column.

Decode ("route_decode"): greedy tokens/s of a random Mixtral-style model with the plan at every
router: unsteered (peer), router hooks doing the eager edit (eager), actshift.patch(experts=...).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

import actshift

from .harness import COMPILE, EAGER, Case, Result, compiled, dtypes, our_backends

UNSTEERED, PATCHED = "unsteered", "actshift-patch"
_TOKENS: dict[str, int] = {}


def _plan(E: int, gen: torch.Generator) -> actshift.ExpertPlan:
    return actshift.ExpertPlan(E, offsets=torch.randn(E, generator=gen), off=[1, 2], on=[0], strength=0.5)


def eager_route(logits, k, offsets, off_mask, on_mask):
    z = logits.float() + offsets
    p = torch.softmax(z.masked_fill(off_mask, float("-inf")), dim=-1)
    idx = torch.where(on_mask, float("inf"), p).topk(k, dim=-1).indices
    w = p.gather(1, idx)
    return idx, w / w.sum(-1, keepdim=True)


def op_cases(device: str, quick: bool) -> Iterator[Case]:
    gen = torch.Generator().manual_seed(0)
    experts = (8, 256) if quick else (8, 64, 128, 256)
    rows_list = (1, 4096) if quick else (1, 16, 256, 4096)
    for dtype in dtypes(device):
        for E in experts:
            plan = _plan(E, gen)
            offsets = (plan.offsets * plan.strength).to(device)
            off_mask = torch.zeros(E, dtype=torch.bool, device=device)
            off_mask[list(plan.off)] = True
            on_mask = torch.zeros(E, dtype=torch.bool, device=device)
            on_mask[list(plan.on)] = True
            for k in (2, 8):
                if k > E - len(plan.off):  # the plan leaves E - 2 experts
                    continue
                for rows in rows_list:
                    logits = torch.randn(rows, E, generator=gen).to(device=device, dtype=dtype)

                    def eager(logits=logits, k=k, offsets=offsets, off_mask=off_mask, on_mask=on_mask):
                        return eager_route(logits, k, offsets, off_mask, on_mask)

                    providers = {EAGER: eager, COMPILE: compiled(eager)}
                    for b in our_backends(device):
                        providers[f"actshift-{b}"] = lambda b=b, logits=logits, k=k, plan=plan: actshift.route(
                            logits, k, plan, backend=b)
                    out = rows * k * 12
                    yield Case("route", "offsets+off+on", f"rows={rows} E={E} k={k}", dtype, providers,
                               bytes_actshift=rows * E * logits.element_size() + out,
                               bytes_eager=rows * E * (logits.element_size() + 5 * 4 * 2) + out)


def decode_cases(device: str, quick: bool) -> Iterator[Case]:
    from transformers import MixtralConfig, MixtralForCausalLM

    gen = torch.Generator().manual_seed(0)
    dtype = dtypes(device)[0]
    size = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8) if quick or \
        device == "cpu" else dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16)
    E, k = 8, 2
    config = MixtralConfig(**size, num_key_value_heads=size["num_attention_heads"], vocab_size=8000,
                           num_local_experts=E, num_experts_per_tok=k, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(device=device, dtype=dtype).eval()
    plan = _plan(E, gen)
    offsets = (plan.offsets * plan.strength).to(device)
    off_mask = torch.zeros(E, dtype=torch.bool, device=device)
    off_mask[list(plan.off)] = True
    on_mask = torch.zeros(E, dtype=torch.bool, device=device)
    on_mask[list(plan.on)] = True
    new_tokens, prompt_len = (8 if quick or device == "cpu" else 64), 8
    ids = torch.randint(3, config.vocab_size, (1, prompt_len), generator=gen).to(device)

    def decode():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)

    def hook(module, args, out):
        idx, w = eager_route(out[0], k, offsets, off_mask, on_mask)
        return out[0], w, idx

    def hooked():
        handles = [b.mlp.gate.register_forward_hook(hook) for b in model.model.layers]
        try:
            return decode()
        finally:
            for h in handles:
                h.remove()

    def patched():
        with actshift.patch(model, experts=plan):
            return decode()

    shape = f"L={config.num_hidden_layers} d={config.hidden_size} E={E} k={k} batch=1"
    _TOKENS[shape] = new_tokens
    yield Case("route_decode", "experts every layer", shape, dtype, {UNSTEERED: decode, EAGER: hooked, PATCHED: patched},
               bytes_actshift=1, bytes_eager=1, note=f"{new_tokens} new tokens after a {prompt_len}-token prompt",
               peer=UNSTEERED)


def cases(device: str, quick: bool) -> Iterator[Case]:
    yield from op_cases(device, quick)
    yield from decode_cases(device, quick)


def summary(results: list[Result]) -> str:
    """Tokens per second of the decode providers, patched vs unsteered and vs hooks."""
    lines = []
    for r in results:
        if r.case.op != "route_decode" or r.provider != PATCHED:
            continue
        group = {x.provider: x for x in results if x.case is r.case}
        tps = {p: _TOKENS[r.case.shape] / (x.median_us * 1e-6) for p, x in group.items()}
        slowdown = 100 * (group[PATCHED].median_us / group[UNSTEERED].median_us - 1)
        lines.append(f"route_decode {r.case.shape}: " + ", ".join(f"{p} {v:.1f} tok/s" for p, v in tps.items())
                     + f"; patched vs unsteered {slowdown:+.1f}% time, hooks vs patched x{group[EAGER].median_us / r.median_us:.3f}")
    return "\n".join(lines)
