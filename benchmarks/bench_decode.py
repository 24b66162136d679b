"""Decode throughput of a random-weight Llama with steering at every block output.

Providers, all on one model, greedy decoding of a fixed number of tokens after a short prompt:
  unsteered          the plain model (reported as the peer: "vs peer" = unsteered time / ours)
  eager              steering the way hook libraries do it (repeng, steering-vectors, CAA): a
                     register_forward_hook per block returning output + coeff * vector
  actshift-patch     actshift.patch(model, steering=plan): the in-place steer kernel per block
Each provider installs its steering, generates and removes it, so they alternate on the same weights.

Two kinds of case:
  Llama-shaped (d 1024, 8 layers; quick: d 512, 4 layers), all threads: the end-to-end view.
  small (d 128 and d 256, 8 layers, vocab 1000, 1 thread, 48 tokens): host-bound, as launch-bound
    GPU decoding is, so the per-layer Python and dispatch cost of steering is what is measured.
Targets: actshift-patch no slower than hooks, and within 2% of unsteered on the small cases.

Sanity check: steering cannot make decoding faster than not steering. A case whose patched median
lies below the unsteered p20 is reported as IMPLAUSIBLE (machine noise: rerun it), not as a ratio.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import actshift

from .harness import EAGER, Case, Result, dtypes

UNSTEERED, PATCHED = "unsteered", "actshift-patch"
_TOKENS: dict[str, int] = {}  # tokens generated per call, by case shape (for tokens/s)


def model_config(quick: bool, small: int | None = None):
    from transformers import LlamaConfig

    if small:
        size = dict(hidden_size=small, intermediate_size=small * 11 // 4, num_hidden_layers=8, num_attention_heads=4,
                    vocab_size=1000)
    elif quick:
        size = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, vocab_size=8000)
    else:
        size = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000)
    return LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"], pad_token_id=0, bos_token_id=1, eos_token_id=2)


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _case(device: str, config, batch: int, new_tokens: int, threads: int | None, label: str) -> Case:
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    dtype = dtypes(device)[0]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    d, layers = config.hidden_size, config.num_hidden_layers
    vector, coeff = torch.randn(d, generator=gen), 4.0
    plan = actshift.SteeringPlan(add=vector, strength=coeff)
    delta = (coeff * vector).to(device=device, dtype=dtype)
    prompt_len = 8
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=gen).to(device)

    def hook(module, args, output):
        return (output[0] + delta,) + tuple(output[1:]) if isinstance(output, tuple) else output + delta

    def decode():
        with torch.no_grad(), _threads(threads):
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)

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

    shape = f"L={layers} d={d} batch={batch}" + (f" threads={threads}" if threads else "")
    note = f"{new_tokens} new tokens after a {prompt_len}-token prompt"
    _TOKENS[shape] = batch * new_tokens
    return Case("decode", label, shape, dtype, {UNSTEERED: decode, EAGER: hooked, PATCHED: patched},
                bytes_actshift=1, bytes_eager=1, note=note, peer=UNSTEERED)


RAW, STEER, STEER_NEW = "raw op", "actshift.steer out=x", "actshift.steer"


def _per_call_case(device: str) -> Case:
    """The host cost of one steer call at decode size, [1, 4096]: the raw op on prebuilt bank
    tensors, the public `steer` (in place and into a new tensor), and a hook's `x + coeff * v`."""
    from actshift.steering.plan import as_bank

    d = 4096
    x = torch.randn(1, d, device=device)
    v = torch.randn(d, device=device)
    plan = actshift.SteeringPlan(add=v, strength=2.0)
    vectors, weights, strength = as_bank(plan).tensors(x.device)
    raw = torch.ops.actshift.steer_out.default  # the C++ op, CPU or CUDA
    return Case("decode", "steer call", f"rows=1 d={d}", torch.float32, {
        EAGER: lambda: x + 2.0 * v,
        RAW: lambda: raw(x, vectors, weights, strength, None, None, x),
        STEER: lambda: actshift.steer(x, plan, out=x),
        STEER_NEW: lambda: actshift.steer(x, plan),
    }, bytes_actshift=1, bytes_eager=1, note="host cost per call; x grows in place (timing only)")


def cases(device: str, quick: bool) -> Iterator[Case]:
    from actshift import backends

    if not backends.unavailable_reason("cpu" if device == "cpu" else "cuda", torch.device(device)):
        yield _per_call_case(device)
    for d in (128,) if quick else (128, 256):
        yield _case(device, model_config(quick, small=d), 1, 16 if quick else 48, 1, "steer small")
    config = model_config(quick)
    new_tokens = 8 if quick or device == "cpu" else 64
    for batch in (1,) if quick or device == "cpu" else (1, 8):  # CPU: batch 8 adds minutes, not insight
        yield _case(device, config, batch, new_tokens, None, "steer blocks")


def implausible(patched: Result, unsteered: Result) -> bool:
    """Steering cannot beat not steering: a patched median below the unsteered p20 is noise."""
    return patched.median_us < unsteered.p20_us


def summary(results: list[Result]) -> str:
    """Milliseconds per token of each provider and the patched/unsteered and patched/hook ratios."""
    lines = []
    for r in results:
        if r.case.op == "decode" and r.provider == STEER:
            group = {x.provider: x.median_us for x in results if x.case is r.case}
            lines.append(f"steer call {r.case.shape}: raw op {group[RAW]:.2f} us, steer(out=x) {group[STEER]:.2f} us "
                         f"(+{group[STEER] - group[RAW]:.2f} us), steer() {group[STEER_NEW]:.2f} us, "
                         f"x + c*v {group[EAGER]:.2f} us")
        if r.case.op != "decode" or r.provider != PATCHED:
            continue
        group = {x.provider: x for x in results if x.case is r.case}
        tokens = _TOKENS[r.case.shape]
        ms = {p: x.median_us * 1e-3 / tokens for p, x in group.items()}
        spread = ", ".join(f"{p} {v:.3f} ms/token ({x.p20_us * 1e-3 / tokens:.3f}-{x.p80_us * 1e-3 / tokens:.3f})"
                           for (p, v), x in zip(ms.items(), group.values()))
        if implausible(r, group[UNSTEERED]):
            r.case.note += "; IMPLAUSIBLE: patched faster than unsteered beyond the p20-p80 spread (noise), rerun"
            lines.append(f"decode {r.case.shape}: {spread}; IMPLAUSIBLE (patched beats unsteered beyond the "
                         "p20-p80 spread: machine noise), no ratio reported; rerun with --op decode")
            continue
        slowdown = 100 * (group[PATCHED].median_us / group[UNSTEERED].median_us - 1)
        lines.append(f"decode {r.case.shape}: {spread}; patched vs unsteered {slowdown:+.1f}% time, "
                     f"hooks vs patched x{group[EAGER].median_us / r.median_us:.3f}")
    return "\n".join(lines)
