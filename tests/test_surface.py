"""The user's surface (issue 15): immutable plans, scalar weights and plan.apply, vector
normalisation, read positions, percentile fractions, undoable relufy, patch(prefill=) and sparse
counters, and the papercuts (pad tokens, progress bars, messages, CLI help, install hints)."""
import builtins
import math
import re
import sys

import pytest
import tiny_lm
import torch
from _sparse_models import batches, tiny

import actshift
from actshift import ood, sparse
from actshift import steering as st
from actshift.steering import extract_activations

TEXTS = ["the cat is happy", "dog is bad", "I love you very very much", "they hate it"]
PAIRS = [("I love the cat", "I hate the cat"), ("we love it", "we hate it"), ("good dog", "bad dog")]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- 1. SteeringPlan is immutable -------------------------------------------------------------------


def test_plan_attributes_cannot_be_set_before_or_after_use():
    v = torch.randn(8)
    p = actshift.SteeringPlan(add=v, strength=4.0)
    with pytest.raises(AttributeError, match="immutable.*with_strength"):
        p.strength = 0.0
    x = torch.randn(3, 8)
    torch.testing.assert_close(actshift.steer(x, p), x + 4.0 * v)  # first use fills the device cache
    for name, value in [("strength", 0.0), ("strength", math.nan), ("vectors", torch.zeros(1, 8)), ("renorm", True)]:
        with pytest.raises(AttributeError):
            setattr(p, name, value)
    with pytest.raises(AttributeError):
        del p.strength
    torch.testing.assert_close(actshift.steer(x, p), x + 4.0 * v)  # still the validated plan
    # Builders hand back frozen plans too.
    with pytest.raises(AttributeError):
        p.monitor(v).strength = 1.0


def test_with_strength_copies_validates_and_leaves_the_original():
    v = torch.randn(8)
    p = actshift.SteeringPlan(add=v, strength=4.0)
    x = torch.randn(5, 8)
    actshift.steer(x, p)  # caches built for p must not leak into the copy
    q = p.with_strength(-1.5)
    assert q is not p and p.strength == 4.0 and q.strength == -1.5
    torch.testing.assert_close(actshift.steer(x, q), x - 1.5 * v)
    torch.testing.assert_close(actshift.steer(x, p), x + 4.0 * v)
    with pytest.raises(AttributeError):
        q.strength = 2.0
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="strength"):
            p.with_strength(bad)
    with pytest.raises(TypeError, match="strength"):
        p.with_strength("1")


def test_repr_shows_vector_norms():
    v = torch.zeros(8)
    v[0] = 3.0
    v[1] = 4.0  # norm 5
    plan = actshift.SteeringPlan(add=torch.stack([v, v / 50]), strength=2.0)
    assert "norm 5, 0.1" in repr(plan)


# --- 2. scalar weights and plan.apply ----------------------------------------------------------------


def test_set_weights_accepts_a_number_for_every_row():
    model = tiny_lm.llama()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    v = torch.randn(32)
    with actshift.patch(model, steering=actshift.SteeringPlan(add=v, strength=2.0)):
        expected = logits(model, ids)  # strength 2, no weights
    with actshift.patch(model, steering=actshift.SteeringPlan(add=v, strength=4.0)) as handle:
        handle.set_weights(0.5)  # 4 · 0.5 = 2 on both rows
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
        handle.set_weights(torch.tensor(0.5))  # a 0-d tensor too
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
        handle.set_weights(torch.tensor([0.5, 0.0]))  # per row still works: row 1 unsteered
        got = logits(model, ids)
        with pytest.raises(TypeError, match="number"):
            handle.set_weights(True)
        with pytest.raises(ValueError, match="finite"):
            handle.set_weights(math.nan)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], logits(model, ids)[1], rtol=1e-5, atol=1e-5)


def test_plan_apply_is_a_one_call_context_manager():
    model = tiny_lm.llama()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    before = logits(model, ids)
    v = torch.randn(32)
    plan = actshift.SteeringPlan(add=v, strength=1.0)
    with actshift.patch(model, steering={1: plan.with_strength(3.0)}):
        expected = logits(model, ids)
    with plan.apply(model, 3.0, layers=1) as handle:
        assert isinstance(handle, actshift.PatchHandle)
        torch.testing.assert_close(logits(model, ids), expected)
    assert torch.equal(logits(model, ids), before)  # unpatched on leaving the block
    with plan.apply(model):  # every layer at the plan's own strength
        assert not torch.allclose(logits(model, ids), before)
    assert torch.equal(logits(model, ids), before)


# --- 3. normalisation -------------------------------------------------------------------------------


def test_caa_and_pca_normalisation():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer("left")
    kw = dict(tokenizer=tok, progress=False)
    raw = st.caa_vectors(model, PAIRS, [0, 1], **kw)
    unit = st.caa_vectors(model, PAIRS, [0, 1], normalize="unit", **kw)
    scaled = st.caa_vectors(model, PAIRS, [0, 1], normalize="mean_norm", **kw)
    pca = st.pca_vectors(model, PAIRS, [0, 1], normalize="mean_norm", **kw)
    # Independent: the mean norm of every prompt's last-token activation at the layer.
    acts = extract_activations(model, [s for p in PAIRS for s in p], [0, 1], **kw)
    for layer in (0, 1):
        mean_norm = float(acts[layer].norm(dim=1).mean())
        r = raw[layer]
        torch.testing.assert_close(unit[layer], r / r.norm())
        torch.testing.assert_close(scaled[layer], r / r.norm() * mean_norm)
        torch.testing.assert_close(float(pca[layer].norm()), mean_norm, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="normalize"):
        st.caa_vectors(model, PAIRS, [0], normalize="l2", **kw)


# --- 4. read positions ------------------------------------------------------------------------------


def alone(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[1][0]  # block 0's output


@pytest.mark.parametrize("side", ["left", "right"])
def test_read_token_index_and_mask(side):
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer(side)
    states = [alone(model, tok, t) for t in TEXTS]
    kw = dict(tokenizer=tok, batch_size=3, progress=False)
    got = extract_activations(model, TEXTS, 0, pooling=-2, **kw)[0]
    torch.testing.assert_close(got, torch.stack([h[-2] for h in states]), rtol=1e-5, atol=1e-5)
    idx = [0, -1, 2, -3]  # one per input; batches of 3 split them 3 + 1
    got = extract_activations(model, TEXTS, 0, pooling=idx, **kw)[0]
    torch.testing.assert_close(got, torch.stack([h[i] for h, i in zip(states, idx)]), rtol=1e-5, atol=1e-5)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, 1] = True
    mask[2, 4:] = True  # input 2 has 6 tokens: tokens 1, 4, 5 (column 6 is past its end)
    got = extract_activations(model, TEXTS, 0, pooling=mask, **kw)[0]
    expected = [h[1] for h in states[:2]] + [states[2][[1, 4, 5]].mean(0), states[3][1]]
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    # CAA at a read position: the mean difference of those positions.
    caa = st.caa_vectors(model, PAIRS, [0], pooling=-2, tokenizer=tok, progress=False)[0]
    pos = torch.stack([alone(model, tok, p)[-2] for p, _ in PAIRS])
    neg = torch.stack([alone(model, tok, n)[-2] for _, n in PAIRS])
    torch.testing.assert_close(caa, (pos - neg).mean(0), rtol=1e-5, atol=1e-5)


def test_read_position_errors_name_pooling():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    kw = dict(tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="pooling index -3 .* input 1, which has 2 tokens"):
        extract_activations(model, ["the cat is", "dog is"], 0, pooling=-3, **kw)
    with pytest.raises(ValueError, match="pooling"):
        extract_activations(model, TEXTS, 0, pooling=[0, 1], **kw)  # not one per input
    with pytest.raises(ValueError, match="pooling mask selects no token of input 0"):
        extract_activations(model, TEXTS, 0, pooling=torch.zeros(4, 3, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="pooling"):
        extract_activations(model, TEXTS, 0, pooling="first", **kw)


# --- 5. percentiles given as fractions ---------------------------------------------------------------


def test_fraction_percentiles_are_refused_unless_intended():
    z = torch.relu(torch.randn(4, 1000))
    with pytest.raises(ValueError, match=r"percentile=0.85 looks like a fraction.*percentile=85.*allow_small_percentile"):
        actshift.percentile_scale(z, 0.85)
    with pytest.raises(ValueError, match="looks like a fraction"):
        actshift.scale_ratio(z, 0.5)
    # Intended: the 0.85th percentile keeps k = D − round(D·0.85/100) = 992 of 1000.
    y, r = actshift.percentile_scale(z, 0.85, return_ratio=True, allow_small_percentile=True)
    top = z.topk(992, dim=1).values.sum(1)
    torch.testing.assert_close(r, z.sum(1) / top)
    torch.testing.assert_close(y, z * torch.exp(r)[:, None])
    # 1 and above are ordinary percentiles.
    actshift.percentile_scale(z, 1.0)


def test_postprocessors_refuse_fraction_percentiles():
    for method in ("scale", "react", "ash_s"):
        with pytest.raises(ValueError, match="looks like a fraction"):
            ood.make_postprocessor(method, percentile=0.9)
        pp = ood.make_postprocessor(method, percentile=0.9, allow_small_percentile=True)
        assert pp.percentile == 0.9
        pp.set_hyperparam([0.5])  # the flag holds for later changes
        assert pp.percentile == 0.5
    with pytest.raises(ValueError, match=r"p_min.*looks like a fraction"):
        ood.make_postprocessor("adascale_a", percentile=(0.6, 0.85))
    pp = ood.make_postprocessor("scale", percentile=85)
    with pytest.raises(ValueError, match="looks like a fraction"):
        pp.set_hyperparam([0.85])
    # The flagged SCALE postprocessor computes with the small percentile end to end.
    head = torch.nn.Linear(64, 3)
    net = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU())
    x = torch.randn(5, 10)
    pp = ood.make_postprocessor("scale", percentile=0.5, allow_small_percentile=True)
    _, conf = pp.postprocess(ood.FeatureClassifier(net, head), x)
    with torch.no_grad():
        z = net(x)
        r = z.sum(1) / z.topk(64 - round(64 * 0.5 / 100), dim=1).values.sum(1)
        expected = torch.logsumexp(torch.exp(r)[:, None] * (z @ head.weight.t()) + head.bias, dim=1)
    torch.testing.assert_close(conf, expected, rtol=1e-5, atol=1e-5)


# --- 6. relufy is undoable ---------------------------------------------------------------------------


def test_relufy_is_undone_by_sparse_unpatch_and_by_the_handle():
    model = tiny("llama")
    ids = batches(1, seed=3)[0]
    before, act = logits(model, ids), model.model.layers[0].mlp.act_fn
    with pytest.warns(UserWarning, match="lossy"):
        assert sparse.relufy(model, "relu") is model
    assert isinstance(model.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    assert sparse.unpatch(model) == 1
    assert model.model.layers[0].mlp.act_fn is act
    assert torch.equal(logits(model, ids), before)
    # Through actshift.patch's handle: actshift.unpatch undoes it with everything else.
    handle = actshift.patch(model, steering=actshift.SteeringPlan(add=torch.randn(64), strength=0.0))
    with pytest.warns(UserWarning):
        sparse.relufy(model, "fatrelu", handle=handle)
    sparse.patch_ffn(model, handle=handle)
    actshift.unpatch(model)
    assert model.model.layers[0].mlp.act_fn is act
    assert torch.equal(logits(model, ids), before)


def test_relufy_not_inplace_returns_a_copy():
    model = tiny("gpt2")
    ids = batches(1, seed=4)[0]
    before = logits(model, ids)
    with pytest.warns(UserWarning):
        copy = sparse.relufy(model, "relu", inplace=False)
    assert copy is not model and isinstance(copy.transformer.h[0].mlp.act, torch.nn.ReLU)
    assert not isinstance(model.transformer.h[0].mlp.act, torch.nn.ReLU)
    assert torch.equal(logits(model, ids), before)
    assert not torch.allclose(logits(copy, ids), before, atol=1e-3)
    with pytest.raises(TypeError, match="inplace"):
        sparse.relufy(model, "relu", inplace="no")
    sparse.patch_sparsity(model, sparse.Thresholds.constant(model, 0.0))
    with pytest.raises(ValueError, match="unpatch"):
        sparse.relufy(model, "relu", inplace=False)
    sparse.unpatch(model)


# --- 7. patch(prefill=) and counters -----------------------------------------------------------------


def test_patch_prefill_sparse_matches_simulated_sparsity():
    model = tiny("llama")
    ids = batches(1, seed=5)[0]
    thr = sparse.Thresholds.constant(model, 0.5)
    dense = logits(model, ids)
    with sparse.simulate(model, thr):  # independent: thresholding hooks at every site
        expected = logits(model, ids)
    with actshift.patch(model, sparsity=thr):
        torch.testing.assert_close(logits(model, ids), dense)  # default: prefill exact
    with actshift.patch(model, sparsity=thr, prefill="sparse"):
        got = logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    with pytest.raises(ValueError, match="prefill"):
        actshift.patch(model, sparsity=thr, prefill="half")
    with pytest.raises(ValueError, match="prefill='sparse' applies to the sparsity"):
        actshift.patch(model, prefill="sparse", steering=actshift.SteeringPlan(add=torch.randn(64)))


def test_counters_count_kernel_calls_and_zeros():
    model = tiny("llama")
    prompt = batches(1, batch=1, seq=5, seed=6)[0]
    thr = sparse.Thresholds.constant(model, 0.3)
    with actshift.patch(model, sparsity=thr):
        counters = sparse.counters(model, count_zeros=True)
        assert len(counters) == 2 * 4 * 1 + 2 * 3  # per layer: q, k, v, o, gate, up, down
        seen = {}  # independent: the inputs each SparseLinear saw at decode

        def grab(name):
            def hook(mod, args):
                if args[0].shape[-2] == 1:
                    x = args[0]
                    z, n = seen.get(name, (0, 0))
                    seen[name] = (z + int((x.abs() <= 0.3).sum()), n + x.numel())
            return hook

        hooks = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules()
                 if isinstance(m, sparse.SparseLinear)]
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        for h in hooks:
            h.remove()
        for name, c in counters.items():
            assert (c.sparse_calls, c.dense_calls) == (3, 1), name  # prefill dense, 3 decode steps
            assert c.sparsity == seen[name][0] / seen[name][1]
        assert "sparse_calls=3" in repr(next(iter(counters.values())))
        sparse.counters(model, reset=True)
        assert all(c.sparse_calls == 0 and c.sparsity is None for c in counters.values())


def test_ffn_counters_and_compiled_module_leaves_counts_alone():
    model = tiny("llama", act="relu")
    sparse.patch_ffn(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 1, 64)
    mlp(x)
    mlp(torch.randn(1, 3, 64))
    assert (mlp.counters.sparse_calls, mlp.counters.dense_calls) == (1, 1)
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)
    assert mlp.counters.sparse_calls == 2  # the eager call only
    sparse.unpatch(model)


# --- 8. papercuts -----------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_batches_anyway():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    got = extract_activations(model, TEXTS, 0, tokenizer=tok, pooling="mean", progress=False)[0]
    assert tok.pad_token is None  # the user's tokenizer is left as it was
    expected = torch.stack([alone(model, tok, t).mean(0) for t in TEXTS])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_progress_bar_only_for_slow_work_or_on_request(capsys):
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    extract_activations(model, TEXTS, 0, tokenizer=tok)  # default: quick work, no bar
    assert capsys.readouterr().err == ""
    extract_activations(model, TEXTS, 0, tokenizer=tok, progress=True)
    assert "extracting" in capsys.readouterr().err
    sparse.calibrate(tiny("llama"), batches(2), 0.5)
    assert capsys.readouterr().err == ""


def test_export_gguf_of_plans_explains_raw_vectors(tmp_path):
    plans = st.plans_from_vectors({1: torch.randn(8)}, strength=2.0)
    with pytest.raises(TypeError, match=r"raw control vectors.*not SteeringPlans"):
        st.export_gguf(tmp_path / "x.gguf", plans, model_hint="llama")


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name.split(".")[0] in ("gguf", "safetensors"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.split(".")[0] in ("gguf", "safetensors")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match=r"'gguf'.*pip install 'actshift\[steering\]'"):
        st.export_gguf(tmp_path / "x.gguf", {1: torch.randn(8)}, model_hint="llama")
    with pytest.raises(ImportError, match=r"'safetensors'.*actshift\[steering\]"):
        st.save(tmp_path / "x.safetensors", {1: torch.randn(8)})


def test_cli_bench_help_lists_ops_and_output_folder(capsys):
    from actshift.benchmarks.run import OPS
    from actshift.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    for name in OPS:
        assert name in flat
    assert "default: benchmarks/results" in flat


def test_info_has_no_empty_lines():
    from actshift.info import format_info, info

    text = format_info(info())
    assert not [line for line in text.splitlines() if re.fullmatch(r"\s+\S+:\s*", line)]
    assert "cuda_reason" in text or "cuda: True" in text  # non-empty reasons stay


def test_docstrings_document_the_arguments():
    from actshift.ood.adascale import AdaScale

    for name in ("lam", "fraction", "epsilon"):
        assert re.search(rf"^\s+{name}: \S", AdaScale.__doc__, re.M), name
    for fn, words in [(ood.make_postprocessor, ["method", "Returns"]), (st.pca_vectors, ["normalize"]),
                      (st.plans_from_vectors, ["strength", "Returns"]), (actshift.unpatch, ["undo"]),
                      (actshift.energy, ["temperature", "Returns"])]:
        assert all(w in fn.__doc__ for w in words), fn.__name__
