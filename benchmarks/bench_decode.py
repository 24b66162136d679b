"""Decode throughput of a random-weight Llama with steering at every block output.

Providers, all on one model, greedy decoding of a fixed number of tokens after a short prompt:
  unsteered          the plain model (reported as the peer: "vs peer" = unsteered time / ours)
  eager              steering the way hook libraries do it (repeng, steering-vectors, CAA): a
                     register_forward_hook per block returning output + coeff * vector
  actshift-patch     actshift.patch(model, steering=plan): the in-place steer kernel per block
Each provider installs its steering, generates and removes it, so they alternate on the same weights.
Target: actshift-patch within 5% of unsteered.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

import actshift

from .harness import EAGER, Case, Result, dtypes

UNSTEERED, PATCHED = "unsteered", "actshift-patch"
_TOKENS: dict[str, int] = {}  # tokens generated per call, by case shape (for tokens/s)


def model_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        size = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, vocab_size=8000)
    else:
        size = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000)
    return LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def cases(device: str, quick: bool) -> Iterator[Case]:
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    dtype = dtypes(device)[0]
    config = model_config(quick)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    d, layers = config.hidden_size, config.num_hidden_layers
    vector, coeff = torch.randn(d, generator=gen), 4.0
    plan = actshift.SteeringPlan(add=vector, strength=coeff)
    delta = (coeff * vector).to(device=device, dtype=dtype)
    new_tokens = 8 if quick or device == "cpu" else 64
    prompt_len = 8

    def hook(module, args, output):
        return (output[0] + delta,) + tuple(output[1:]) if isinstance(output, tuple) else output + delta

    for batch in (1,) if quick or device == "cpu" else (1, 8):  # CPU: batch 8 adds minutes, not insight
        ids = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=gen).to(device)

        def decode(ids=ids):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def hooked():
            handles = [block.register_forward_hook(hook) for block in model.model.layers]
            try:
                return decode()
            finally:
                for h in handles:
                    h.remove()

        def patched():
            with actshift.patch(model, steering=plan):
                return decode()

        shape = f"L={layers} d={d} batch={batch}"
        note = f"{new_tokens} new tokens after a {prompt_len}-token prompt"
        _TOKENS[shape] = batch * new_tokens
        yield Case("decode", "steer blocks", shape, dtype, {UNSTEERED: decode, EAGER: hooked, PATCHED: patched},
                   bytes_actshift=1, bytes_eager=1, note=note, peer=UNSTEERED)


def summary(results: list[Result]) -> str:
    """Tokens per second of each provider and the patched/unsteered and patched/hook ratios."""
    lines = []
    for r in results:
        if r.case.op != "decode" or r.provider != PATCHED:
            continue
        group = {x.provider: x for x in results if x.case is r.case}
        tokens = _TOKENS[r.case.shape]
        tps = {p: tokens / (x.median_us * 1e-6) for p, x in group.items()}
        slowdown = 100 * (group[PATCHED].median_us / group[UNSTEERED].median_us - 1)
        lines.append(f"decode {r.case.shape}: " + ", ".join(f"{p} {v:.1f} tok/s" for p, v in tps.items())
                     + f"; patched vs unsteered {slowdown:+.1f}% time, hooks vs patched x{group[EAGER].median_us / r.median_us:.3f}")
    return "\n".join(lines)
