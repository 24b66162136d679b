"""Module swaps: SparseLinear / CatsMLP (patch_sparsity), exact ReLU-sparse FFNs (patch_ffn),
relufy, sparsity_report, undo, bad input. Tiny random-weight models, CPU, fp32."""
import warnings

import pytest
import torch
from _sparse_models import batches, tiny
from conftest import assert_close

import actshift
from actshift import sparse
from actshift.integrations.transformers import cache_keyword
from transformers import DynamicCache

GEN_TOKENS = 32


def spy(monkeypatch, name):
    """Counts calls of actshift.<name> (the modules look it up at call time) and keeps the args."""
    calls = []
    real = getattr(actshift, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(actshift, name, wrapper)
    return calls


def decode_logits(model, ids):
    """Logits of one decode step (the last token of ids) after a cached prefill of the rest."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        kw = {cache_keyword(model): cache}
        model(input_ids=ids[:, :-1], use_cache=True, **kw)
        return model(input_ids=ids[:, -1:], use_cache=True, **kw).logits[:, -1]


def generate(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_TOKENS,
                              min_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0)


def modules_of(model):
    return [(n, m) for n, m in model.named_modules()]


def same_modules(a, b):
    return len(a) == len(b) and all(na == nb and ma is mb for (na, ma), (nb, mb) in zip(a, b))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "opt"])
def test_threshold_zero_reproduces_dense_decoder(kind, monkeypatch):
    model = tiny(kind)
    ids = batches(1, batch=3, seq=9)[0]
    prompt = ids[:2, :6]
    ref_logits, ref_tokens = decode_logits(model, ids), generate(model, prompt)
    before = modules_of(model)
    calls = spy(monkeypatch, "sparse_linear")
    undo = sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0))
    swapped = [m for m in model.modules() if isinstance(m, sparse.SparseLinear)]
    # Per layer: 7 (gated), 6 (OPT: fc1, fc2) or 4 (GPT-2: fused c_attn, c_fc).
    assert len(swapped) == {"gpt2": 8, "opt": 12}.get(kind, 14)
    assert_close(decode_logits(model, ids), ref_logits, torch.float32)
    assert len(calls) == len(swapped)  # the decode step ran every linear through the sparse kernel
    assert torch.equal(generate(model, prompt), ref_tokens)
    undo()
    assert same_modules(modules_of(model), before)
    assert torch.equal(generate(model, prompt), ref_tokens)


def test_threshold_zero_bert_and_sparse_prefill(monkeypatch):
    model = tiny("bert")
    ids = batches(1, batch=4, seq=12)[0]
    with torch.no_grad():
        ref_tok = model(input_ids=ids[:, :1]).last_hidden_state  # 4 rows of one token: the sparse path
        ref_seq = model(input_ids=ids).last_hidden_state
    calls = spy(monkeypatch, "sparse_linear")
    sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0), prefill="sparse")
    with torch.no_grad():
        assert_close(model(input_ids=ids[:, :1]).last_hidden_state, ref_tok, torch.float32)
        assert len(calls) == 12
        assert_close(model(input_ids=ids).last_hidden_state, ref_seq, torch.float32)
    assert len(calls) == 12  # a 12-token sequence is prefill: dense
    assert sparse.unpatch(model) == 1 and sparse.unpatch(model) == 0


def test_quality_error_grows_with_sparsity(monkeypatch):
    """Decode-step logits drift from dense as TEAL sparsity rises (0 at 0), and the patched model's
    decode inputs on held-out prompts are zeroed at the calibrated rate."""
    model = tiny("llama")
    calib = batches(4, batch=4, seq=32, seed=11)
    held = batches(1, batch=8, seq=20, seed=12)[0]
    ref = decode_logits(model, held)
    errs = []
    for target in (0.0, 0.25, 0.5, 0.75, 0.9):
        thr = sparse.calibrate(model, calib, target, progress=False)
        calls = spy(monkeypatch, "sparse_linear")
        sparse.patch_sparsity(model, thr)
        logits = decode_logits(model, held)
        sparse.unpatch(model)
        monkeypatch.undo()
        errs.append(((logits - ref).norm() / ref.norm()).item())
        zeroed = sum(int((x.abs() <= float(t)).sum()) for x, _, t, *_ in calls)
        total = sum(x.numel() for x, *_ in calls)
        assert abs(zeroed / total - target) < 0.05, (target, zeroed / total)
    assert errs[0] < 1e-5
    assert all(b >= 0.9 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] > 3 * errs[1] > 0, errs


def test_cats_patch_matches_simulation(monkeypatch):
    model = tiny("llama")
    ids = batches(1, batch=3, seq=10, seed=13)[0]
    thr = sparse.calibrate(model, batches(2, seed=14), 0.5, sites="cats", progress=False)
    with sparse.simulate(model, thr):  # hooks threshold |silu(gate)| in plain PyTorch
        expected = decode_logits(model, ids)
    dense = decode_logits(model, ids)
    calls = spy(monkeypatch, "cats_mlp")
    sparse.patch_sparsity(model, thr, prefill="sparse")
    assert all(isinstance(layer.mlp, sparse.CatsMLP) for layer in model.model.layers)
    got = decode_logits(model, ids)
    assert len(calls) == 2
    assert_close(got, expected, torch.float32)
    assert not torch.allclose(got, dense, atol=1e-3)  # CATS is lossy
    sparse.unpatch(model)
    assert_close(decode_logits(model, ids), dense, torch.float32)


@pytest.mark.parametrize("kind,act", [("llama", "relu"), ("mistral", "relu"), ("qwen3", "relu2"), ("gpt2", "relu"),
                                      ("opt", "relu")])
def test_patch_ffn_generates_same_tokens(kind, act, monkeypatch):
    model = tiny(kind, act=act)
    prompt = batches(1, batch=2, seq=6, seed=15)[0]
    ref = generate(model, prompt)
    before = modules_of(model)
    calls = spy(monkeypatch, "relu_ffn")
    sparse.patch_ffn(model, "relu_sparse")
    assert torch.equal(generate(model, prompt), ref)
    # Every decode step, both layers; OPT flattens to [batch·seq, d] before fc1, so its 12-row
    # prompt counts as <= 16 rows and runs the (exact) kernel too.
    assert len(calls) == 2 * (GEN_TOKENS - 1) + (2 if kind == "opt" else 0)
    sparse.unpatch(model)
    assert same_modules(modules_of(model), before)


def test_patch_ffn_relufied_fatrelu_at_90_percent(monkeypatch):
    model = tiny("llama")
    with pytest.warns(UserWarning, match="lossy"):
        sparse.relufy(model, "fatrelu")
    ts = sparse.calibrate_fatrelu(model, batches(3, seed=16), 0.9, progress=False)
    assert len(ts) == 2 and all(t > 0 for t in ts)
    report = sparse.sparsity_report(model, batches(2, seed=17))
    assert abs(report.mean - 0.9) < 0.05, str(report)
    prompt = batches(1, batch=2, seq=6, seed=18)[0]
    ref = generate(model, prompt)
    calls = spy(monkeypatch, "relu_ffn")
    sparse.patch_ffn(model)
    assert torch.equal(generate(model, prompt), ref)
    assert calls and all(c[4] == "fatrelu" and c[5] in ts for c in calls)


def test_patch_ffn_bert_keeps_residual_layernorm_exact(monkeypatch):
    model = tiny("bert", act="relu")
    ids = batches(1, batch=4, seq=12, seed=19)[0]
    with torch.no_grad():
        ref_tok, ref_seq = model(input_ids=ids[:, :1]).last_hidden_state, model(input_ids=ids).last_hidden_state
    calls = spy(monkeypatch, "relu_ffn")
    sparse.patch_ffn(model)
    assert isinstance(model.encoder.layer[0].output.dense, torch.nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref_seq)  # prefill: the original modules
        assert not calls
        assert_close(model(input_ids=ids[:, :1]).last_hidden_state, ref_tok, torch.float32)
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "opt"])
def test_patch_ffn_refuses_non_relu(kind):
    model = tiny(kind, act="gelu" if kind != "llama" else "silu")
    before = modules_of(model)
    with pytest.raises(ValueError, match="not ReLU-family.*relufy"):
        sparse.patch_ffn(model)
    assert same_modules(modules_of(model), before)  # nothing half-patched


def test_relufy_is_lossy_and_report_counts_zeros():
    model = tiny("gpt2")
    ids = batches(1, seed=20)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="lossy"):
        assert sparse.relufy(model, "relu") is model
    assert all(isinstance(b.mlp.act, torch.nn.ReLU) for b in model.transformer.h)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-3)
    # Independent count: share of c_fc outputs <= 0 (ReLU zeroes exactly those).
    neg = []
    hooks = [b.mlp.c_fc.register_forward_hook(lambda m, a, o: neg.append((o <= 0).float().mean().item()))
             for b in model.transformer.h]
    report = sparse.sparsity_report(model, ids)
    for h in hooks:
        h.remove()
    assert [report[(i, "ffn")] for i in range(2)] == pytest.approx(neg, abs=1e-6)
    assert "ffn" in str(report) and 0 < report.mean < 1


def test_actshift_patch_composes_swaps_with_steering(monkeypatch):
    """actshift.patch(sparsity=, ffn=, steering=) swaps, steers the swapped model, and unpatch
    restores every original module; the swaps run the sparse kernels at decode."""
    model = tiny("llama", act="relu")
    ids = batches(1, batch=2, seq=9)[0]
    before, ref = modules_of(model), decode_logits(model, ids)
    plan = actshift.SteeringPlan(add=torch.randn(model.config.hidden_size), strength=0.5)
    linear_calls, ffn_calls = spy(monkeypatch, "sparse_linear"), spy(monkeypatch, "relu_ffn")
    thresholds = sparse.Thresholds.constant(model, 0.0, sites=("qkv", "o"))
    handle = actshift.patch(model, sparsity=thresholds, ffn="relu_sparse", steering=plan)
    assert isinstance(model.model.layers[1].self_attn.v_proj, sparse.SparseLinear)
    assert isinstance(model.model.layers[0].mlp, sparse.ReluGatedMLP)
    steered = decode_logits(model, ids)
    assert linear_calls and ffn_calls
    # Threshold 0 and exact FFN skipping change nothing, so the result is the steering alone.
    actshift.unpatch(model)
    assert same_modules(modules_of(model), before)
    assert_close(decode_logits(model, ids), ref, torch.float32)
    with actshift.patch(model, steering=plan):
        assert_close(steered, decode_logits(model, ids), torch.float32)
    with pytest.raises(TypeError, match="thresholds must be"):
        actshift.patch(model, sparsity={"threshold": 0.1})
    with pytest.raises(ValueError, match="mode must be"):
        actshift.patch(model, ffn="relu")
    assert same_modules(modules_of(model), before)  # a failed patch leaves nothing behind


def test_conflicting_feature_combination_is_rejected_up_front():
    """sparsity= over FFN sites and ffn="relu_sparse" both want the FFN: the error names the
    conflict (not "already swapped"), before anything changes; every other pairing composes."""
    model = tiny("llama", act="relu")
    before = modules_of(model)
    plan = actshift.SteeringPlan(add=torch.randn(model.config.hidden_size), strength=0.5)
    for sites in (sparse.TEAL_SITES, ("down",), "cats"):
        thresholds = sparse.Thresholds.constant(tiny("llama"), 0.0, sites=sites)
        with pytest.raises(ValueError, match="replaces the whole FFN.*sites=\\('qkv', 'o'\\)"):
            actshift.patch(model, sparsity=thresholds, ffn="relu_sparse", steering=plan)
        assert same_modules(modules_of(model), before) and actshift.integrations.transformers.get_handle(model) is None
    full = sparse.Thresholds.constant(model, 0.0)
    for kwargs in ({"sparsity": full}, {"ffn": "relu_sparse"}, {"sparsity": full, "steering": plan},
                   {"ffn": "relu_sparse", "steering": plan}):
        with actshift.patch(model, **kwargs):
            assert not same_modules(modules_of(model), before)
        assert same_modules(modules_of(model), before)


def test_compiled_modules_match_eager():
    model = tiny("llama", act="relu")
    layer = model.model.layers[0]
    lin = sparse.SparseLinear(layer.self_attn.q_proj, 0.3)
    ffn = sparse.ReluGatedMLP(layer.mlp, "relu")
    x = torch.randn(3, 1, 64)
    with torch.no_grad():  # inference: the ops have no autograd formula
        for mod in (lin, ffn):
            compiled = torch.compile(mod, fullgraph=True)
            assert_close(compiled(x), mod(x), torch.float32)


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(TypeError, match="thresholds"):
        sparse.patch_sparsity(model, 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        sparse.patch_sparsity(model, sparse.Thresholds({(7, "qkv"): 0.1}))
    with pytest.raises(ValueError, match="thresholds"):
        sparse.patch_sparsity(tiny("gpt2"), sparse.Thresholds({(0, "cats"): 0.1}))
    with pytest.raises(ValueError, match="prefill"):
        sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0), prefill="half")
    with pytest.raises(ValueError, match="mode"):
        sparse.patch_ffn(model, "cats")
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
        sparse.patch_sparsity(torch.nn.Sequential(torch.nn.Linear(4, 4)), sparse.Thresholds({(0, "qkv"): 0.1}))
    with pytest.raises(ValueError, match="threshold"):
        sparse.SparseLinear(torch.nn.Linear(4, 4), -0.1)
    with pytest.raises(ValueError, match="threshold"):
        sparse.SparseLinear(torch.nn.Linear(4, 4), float("inf"))
    with pytest.raises(ValueError, match="model"):
        sparse.SparseLinear(torch.nn.Conv2d(4, 4, 1), 0.1)
    with pytest.raises(ValueError, match="act"):
        sparse.relufy(model, "gelu")
    with pytest.raises(ValueError, match="threshold"):
        sparse.relufy(model, "relu", threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        sparse.relufy(model, "fatrelu", threshold=[0.1])
    with pytest.raises(ValueError, match="model"):
        sparse.calibrate_fatrelu(model, batches(1), 0.9, progress=False)  # not relufied
    # Swapping twice, or FFN after sparsity on the same MLP, is refused without changing anything.
    sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0))
    with pytest.raises(ValueError, match="already swapped"):
        sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse.relufy(model, "relu")
    with pytest.raises(ValueError, match="already swapped"):
        sparse.patch_ffn(model)
    assert sparse.unpatch(model) == 2  # relufy, then the sparsity swap: relufy is undoable too
    assert not isinstance(model.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse.relufy(model, "relu")
    sparse.patch_ffn(model)
    with pytest.raises(ValueError, match="patched"):
        sparse.sparsity_report(model, batches(1))
