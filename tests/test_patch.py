"""actshift.patch / unpatch on tiny random-weight transformers models: every site of every supported
architecture against plain forward hooks, exact restoration, per-instance isolation, KV-cache
generation vs recomputation without cache, left padding, per-row banks and weights, step callbacks,
torch.compile and CUDA graphs of a decode step, and bad inputs."""
import inspect

import pytest
import torch
from conftest import cpu_backends, require_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actshift
from actshift.integrations import transformers as integ

T = pytest.importorskip("transformers")
KW = integ.cache_keyword(T.LlamaForCausalLM)  # "cache" (5.24 on) or "past_key_values"

D = 32
DECODER = dict(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**DECODER),
    "mistral": lambda: T.MistralConfig(**DECODER),
    "qwen2": lambda: T.Qwen2Config(**DECODER),
    "qwen3": lambda: T.Qwen3Config(**DECODER),
    "gemma2": lambda: T.Gemma2Config(**DECODER),
    "gemma3_text": lambda: T.Gemma3TextConfig(**DECODER),
    "phi3": lambda: T.Phi3Config(**DECODER),
    "gpt2": lambda: T.GPT2Config(vocab_size=100, n_embd=D, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bert": lambda: T.BertConfig(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "opt": lambda: T.OPTConfig(vocab_size=100, hidden_size=D, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=D, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# Full module names per architecture, written out here (not taken from the locator table) so the
# hook reference checks that patch finds the right modules: (blocks, attention, mlp).
PATHS = {
    **{a: ("model.layers", "self_attn", "mlp") for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")},
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "bert": ("encoder.layer", "attention.output.dense", "output.dense"),
    "opt": ("model.decoder.layers", "self_attn", None),  # fc1/fc2 sit in the block: no MLP module
}


def tiny(arch="llama", seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = T.BertModel(config) if arch == "bert" else T.AutoModelForCausalLM.from_config(config)
    return model.eval()


def run(model, ids, **kw):
    with torch.no_grad():
        out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def hook_reference(model, arch, layer, site, vec):
    """Independent steering with forward hooks, out of place: x + vec at the site."""
    blocks, attn, mlp = PATHS[arch]
    block = model.get_submodule(f"{blocks}.{layer}")

    def post(module, args, out):
        return (out[0] + vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + vec

    if site == "block_input":
        def pre(module, args, kwargs):
            if args:
                return (args[0] + vec,) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vec}

        return block.register_forward_pre_hook(pre, with_kwargs=True)
    target = {"block_output": block, "attention_output": attn, "mlp_output": mlp}[site]
    target = block.get_submodule(target) if isinstance(target, str) else target
    return target.register_forward_hook(post)


# --- sites and architectures ----------------------------------------------------------------------


@pytest.mark.parametrize("site", integ.SITES)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_site_matches_hook_reference_and_unpatch_is_exact(arch, site):
    model = tiny(arch)
    if site == "mlp_output" and PATHS[arch][2] is None:
        with pytest.raises(ValueError, match="no separate mlp module"):
            actshift.patch(model, steering=actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D)), site=site))
        assert not any("forward" in m.__dict__ for m in model.modules())
        return
    ids = torch.randint(3, 100, (2, 6))
    before = run(model, ids)
    vec = torch.randn(D)
    h = hook_reference(model, arch, 1, site, 3.0 * vec)
    expected = run(model, ids)
    h.remove()
    assert not torch.allclose(expected, before, atol=1e-3)  # the site changes the output

    handle = actshift.patch(model, steering=actshift.SteeringSite(actshift.SteeringPlan(add=vec, strength=3.0), layers=1, site=site))
    got = run(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    handle.unpatch()
    assert torch.equal(run(model, ids), before)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("backend", cpu_backends())
def test_all_layers_default_site_over_backends(backend):
    require_backend(backend, "cpu")
    model = tiny("llama")
    ids = torch.randint(3, 100, (2, 5))
    vec = torch.randn(D)
    hooks = [hook_reference(model, "llama", i, "block_output", -2.0 * vec) for i in range(2)]
    expected = run(model, ids)
    for h in hooks:
        h.remove()
    with actshift.patch(model, steering=actshift.SteeringPlan(add=vec, strength=-2.0), backend=backend):
        torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert actshift.integrations.transformers.get_handle(model) is None


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.integers(1, 9), batch=st.integers(1, 3), layers=st.lists(st.integers(-2, 1), min_size=1, max_size=3),
       site=st.sampled_from(integ.SITES), strength=st.floats(-4, 4))
def test_property_layers_sites_shapes(seq, batch, layers, site, strength):
    model = _LLAMA
    ids = torch.randint(3, 100, (batch, seq))
    vec = torch.randn(D)
    hooks = [hook_reference(model, "llama", i % 2, site, strength * vec) for i in layers]
    expected = run(model, ids)
    for h in hooks:
        h.remove()
    plan = actshift.SteeringPlan(add=vec, strength=strength)
    with actshift.patch(model, steering=actshift.SteeringSite(plan, layers=layers, site=site)):
        torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)


_LLAMA = tiny("llama", seed=1)


def test_mapping_and_list_specs_stack():
    model = tiny("llama")
    ids = torch.randint(3, 100, (1, 4))
    v0, v1 = torch.randn(D), torch.randn(D)
    hooks = [hook_reference(model, "llama", 0, "block_output", v0), hook_reference(model, "llama", 1, "mlp_output", v1),
             hook_reference(model, "llama", 1, "mlp_output", 2 * v1)]
    expected = run(model, ids)
    for h in hooks:
        h.remove()
    plan1 = actshift.SteeringPlan(add=v1)
    specs = [actshift.SteeringSite(actshift.SteeringPlan(add=v0), layers=range(1)),
             actshift.SteeringSite(plan1, layers=[1], site="mlp_output"),
             actshift.SteeringSite(actshift.SteeringPlan(add=v1, strength=2.0), layers=[-1], site="mlp_output")]
    with actshift.patch(model, steering=specs):
        torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)
    hooks = [hook_reference(model, "llama", 1, "block_output", v1)]
    expected = run(model, ids)
    hooks[0].remove()
    with actshift.patch(model, steering={1: plan1}):
        torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)


# --- isolation and in-place safety ----------------------------------------------------------------


def test_second_instance_and_class_unaffected():
    a, b = tiny("llama"), tiny("llama")
    ids = torch.randint(3, 100, (2, 5))
    base = run(b, ids)
    cls_forward = type(a.model.layers[0]).forward
    signatures = [inspect.signature(m.forward) for m in (a, a.model.layers[0], a.model.layers[0].mlp)]
    with actshift.patch(a, steering=actshift.SteeringPlan(add=torch.randn(D), strength=4.0)):
        # generate() decides what to pass (attention_mask, position_ids, logits_to_keep) from these
        assert [inspect.signature(m.forward) for m in (a, a.model.layers[0], a.model.layers[0].mlp)] == signatures
        assert not torch.allclose(run(a, ids), base, atol=1e-3)
        assert torch.equal(run(b, ids), base)
        assert type(a.model.layers[0]).forward is cls_forward and "forward" not in b.model.layers[0].__dict__
    assert torch.equal(run(a, ids), base)


def test_patched_model_can_be_garbage_collected_and_submodule_calls_are_caught():
    import gc
    import weakref

    model = tiny("llama")
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D)), positions="prompt")
    handle = actshift.patch(model, steering=site)
    with pytest.raises(RuntimeError, match="patched model itself"):
        model.model(torch.randint(3, 100, (1, 3)))  # bypasses the step tracking of the patched model
    ref = weakref.ref(model)
    del model, handle  # no global registry keeps a patched model alive
    gc.collect()
    assert ref() is None


def test_steering_never_mutates_tensors_the_model_keeps():
    model = tiny("llama")
    ids = torch.randint(3, 100, (1, 5))
    vec = torch.randn(D)
    plain = model(ids, output_hidden_states=True).hidden_states
    # block_input of layer 1 is layer 0's output: the recorded hidden state must stay unsteered
    with torch.no_grad(), actshift.patch(model, steering=actshift.SteeringSite(actshift.SteeringPlan(add=vec), layers=1, site="block_input")):
        hs = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(hs[1], plain[1])
    # block_output of layer 0 is steered where the model (and the recorder) see it
    with torch.no_grad(), actshift.patch(model, steering={0: actshift.SteeringPlan(add=vec)}):
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[1], plain[1] + vec)


def test_module_returning_its_input_is_steered_out_of_place():
    handle = integ.PatchHandle(torch.nn.Identity(), "auto")
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.ones(4)))
    fwd = integ._steered_forward(lambda x: x, [], [(0, site)], handle)
    x = torch.zeros(2, 3, 4)
    y = fwd(x)
    assert torch.equal(x, torch.zeros(2, 3, 4)) and torch.equal(y, torch.ones(2, 3, 4))


# --- generation with the KV cache -----------------------------------------------------------------


def greedy(model, ids, n, **kw):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def greedy_without_cache(model, ids, n):
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(n):
            last = model(seq, use_cache=False).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(logits, 1)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "mask"])
def test_cached_generation_equals_recomputation(positions):
    model = tiny("llama")
    ids = torch.randint(3, 100, (1, 6))
    n = 6
    plain, _ = greedy(model, ids, n)
    if positions == "mask":
        positions = torch.zeros(1, 10, dtype=torch.bool)
        positions[0, [1, 4, 6, 8]] = True  # two prompt and two generated positions; none past 10
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D), strength=8.0), positions=positions)
    with actshift.patch(model, steering=site) as handle:
        seq, logits = greedy(model, ids, n)
        handle.set_prompt_length(ids.shape[1])
        seq2, logits2 = greedy_without_cache(model, ids, n)
    assert torch.equal(seq, seq2)
    torch.testing.assert_close(logits, logits2, rtol=1e-4, atol=1e-4)
    assert not torch.equal(seq, plain) or positions == "prompt"


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen3", "gemma3_text", "phi3"])
def test_cached_generation_equals_recomputation_other_architectures(arch):
    model = tiny(arch)
    ids = torch.randint(3, 100, (2, 5))
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D), strength=8.0), positions="generated")
    with actshift.patch(model, steering=site) as handle:
        seq, logits = greedy(model, ids, 4)
        handle.set_prompt_length(ids.shape[1])
        seq2, logits2 = greedy_without_cache(model, ids, 4)
    assert torch.equal(seq, seq2)
    torch.testing.assert_close(logits, logits2, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_each_request_alone():
    model = tiny("llama")
    prompts = [torch.randint(3, 100, (5,)), torch.randint(3, 100, (8,))]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 8 - len(p):], mask[r, 8 - len(p):] = p, 1
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D), strength=6.0), positions="generated")
    with actshift.patch(model, steering=site):
        batch, logits = greedy(model, ids, 5, attention_mask=mask)
        for r, p in enumerate(prompts):
            alone, alone_logits = greedy(model, p[None], 5)
            assert torch.equal(batch[r, 8:], alone[0, len(p):])
            torch.testing.assert_close(logits[r], alone_logits[0], rtol=1e-4, atol=1e-4)


# --- batched serving ------------------------------------------------------------------------------


def test_bank_slots_and_weights_batch_equals_each_request_alone():
    model = tiny("llama")
    vecs = torch.randn(2, D)
    plans = [actshift.SteeringPlan(add=vecs[0], strength=5.0), actshift.SteeringPlan(add=vecs[1], strength=-5.0)]
    slots = torch.tensor([0, 1, -1, 1])
    weights = torch.tensor([1.0, 0.5, 1.0, 2.0])
    ids = torch.randint(3, 100, (4, 5))
    with actshift.patch(model, steering=actshift.SteeringBank(plans)) as handle:
        handle.set_slots(slots)
        handle.set_weights(weights)
        batch, logits = greedy(model, ids, 4)
    for r in range(4):
        s = int(slots[r])
        if s < 0:
            alone, alone_logits = greedy(model, ids[r:r + 1], 4)
        else:
            plan = actshift.SteeringPlan(add=vecs[s], strength=plans[s].strength * float(weights[r]))
            with actshift.patch(model, steering=plan):
                alone, alone_logits = greedy(model, ids[r:r + 1], 4)
        assert torch.equal(batch[r], alone[0])
        torch.testing.assert_close(logits[r], alone_logits[0], rtol=1e-4, atol=1e-4)


def test_on_step_callback_drives_per_step_weights():
    model = tiny("llama")
    ids = torch.randint(3, 100, (2, 5))
    site = actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D), strength=8.0), name="style")
    seen = []

    def prompt_only(handle, step):
        seen.append(step.past_length)
        handle.set_weights({"style": torch.full((2,), 1.0 if step.past_length == 0 else 0.0)})

    with actshift.patch(model, steering=site) as handle:
        remove = handle.on_step(prompt_only)
        dynamic, dyn_logits = greedy(model, ids, 4)
        remove()
    assert seen == [0, 5, 6, 7]
    site = actshift.SteeringSite(site.plan, positions="prompt")
    with actshift.patch(model, steering=site):
        fixed, fixed_logits = greedy(model, ids, 4)
    assert torch.equal(dynamic, fixed)
    torch.testing.assert_close(dyn_logits, fixed_logits, rtol=1e-5, atol=1e-5)


# --- torch.compile and CUDA graphs of a decode step -----------------------------------------------


def _prefilled(model, ids, max_len=16):
    cache = T.StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        model(ids, **{KW: cache}, use_cache=True)
    return cache


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    model = tiny("llama")
    bank = actshift.SteeringBank([actshift.SteeringPlan(add=torch.randn(D), strength=3.0)] * 2)
    ids, nxt = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 1))

    def step(tok, cache):
        return model(input_ids=tok, **{KW: cache}, use_cache=True).logits

    with torch.no_grad():
        plain = step(nxt, _prefilled(model, ids))
        with actshift.patch(model, steering=bank) as handle:
            handle.set_slots(torch.tensor([1, -1]))
            eager_cache, compiled_cache = _prefilled(model, ids), _prefilled(model, ids)
            expected = step(nxt, eager_cache)
            got = torch.compile(step, fullgraph=True)(nxt, compiled_cache)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], plain[0], atol=1e-3)  # row 0 steered (its prefill too)
    torch.testing.assert_close(expected[1], plain[1], rtol=1e-5, atol=1e-5)  # slot -1: untouched


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_decode_step_matches_eager(backend):
    require_backend(backend, "cuda")
    model = tiny("llama").cuda().half()
    plans = [actshift.SteeringPlan(add=torch.randn(D), strength=3.0), actshift.SteeringPlan(add=torch.randn(D), strength=-2.0)]
    ids = torch.randint(3, 100, (3, 5), device="cuda")
    with actshift.patch(model, steering=actshift.SteeringBank(plans), backend=backend) as handle:
        handle.set_slots(torch.tensor([0, 1, -1], device="cuda"))
        handle.set_weights(torch.ones(3, device="cuda"))
        eager_cache, graph_cache = _prefilled(model, ids), _prefilled(model, ids)
        tok = torch.randint(3, 100, (3, 1), device="cuda")
        with torch.no_grad():
            expected = model(input_ids=tok, **{KW: eager_cache}, use_cache=True).logits
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the capture (allocations, autotuning)
                warm_cache = _prefilled(model, ids)
                model(input_ids=tok, **{KW: warm_cache}, use_cache=True)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(input_ids=tok, **{KW: graph_cache}, use_cache=True).logits
            graph.replay()
            torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
            # a later weight update reaches the captured graph (same buffers): the next step unsteered
            handle.set_weights(torch.zeros(3, device="cuda"))
            expected2 = model(input_ids=tok, **{KW: eager_cache}, use_cache=True).logits
            graph.replay()
            torch.testing.assert_close(out, expected2, rtol=1e-3, atol=1e-3)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    model = tiny("llama")
    plan = actshift.SteeringPlan(add=torch.randn(D))
    with pytest.raises(ValueError, match="site"):
        actshift.SteeringSite(plan, site="residual")
    with pytest.raises(ValueError, match="layer 2"):
        actshift.patch(model, steering={2: plan})
    with pytest.raises(ValueError, match="layer -3"):
        actshift.patch(model, steering=actshift.SteeringSite(plan, layers=[-3]))
    with pytest.raises(ValueError, match="hidden size 16 but the model's hidden size is 32"):
        actshift.patch(model, steering=actshift.SteeringPlan(add=torch.randn(16)))
    with pytest.raises(ValueError, match="positions"):
        actshift.SteeringSite(plan, positions="decode")
    with pytest.raises(TypeError, match="positions"):
        actshift.SteeringSite(plan, positions=torch.ones(1, 4))
    with pytest.raises(TypeError, match="mapping keys"):
        actshift.patch(model, steering={"0": plan})
    with pytest.raises(TypeError, match="steering must be"):
        actshift.patch(model, steering="add")
    with pytest.raises(TypeError, match="plan must be"):
        actshift.SteeringSite(plan=torch.randn(D))
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):  # as every integration
        actshift.patch(torch.nn.Linear(2, 2), steering=plan)
    with pytest.raises(ValueError, match="not patched"):
        actshift.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())  # failed patches left nothing behind

    with actshift.patch(model, steering=actshift.SteeringBank([plan, plan])) as handle:
        with pytest.raises(ValueError, match="already patched"):
            actshift.patch(model, steering=plan)
        ids = torch.randint(3, 100, (2, 3))
        with pytest.raises(ValueError, match="set_slots"):
            run(model, ids)
        with pytest.raises(ValueError, match="slots holds 2"):
            handle.set_slots(torch.tensor([0, 2]))
        with pytest.raises(TypeError, match="slots"):
            handle.set_slots(torch.tensor([0.0, 1.0]))
        handle.set_slots(torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match="slots hold 3 rows but the batch has 2"):
            run(model, ids)
        with pytest.raises(ValueError, match="no SteeringSite"):
            handle.set_weights({"nope": torch.ones(2)})
        with pytest.raises(TypeError, match="weights"):
            handle.set_weights(torch.ones(2, dtype=torch.long))
        with pytest.raises(ValueError, match="prompt length"):
            handle.set_prompt_length(-1)
    with pytest.raises(ValueError, match="not supported"):
        bad = tiny("llama")
        bad.config.model_type = "mamba"
        actshift.patch(bad, steering=plan)
