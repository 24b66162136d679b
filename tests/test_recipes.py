"""Steering recipes: each one's math against an independent computation (numpy, scikit-learn, the
model's own hidden states, hand-written hooks), on tiny random models; and bad inputs."""
import numpy as np
import pytest
import tiny_lm
import torch
from sklearn.decomposition import PCA

import actshift
from actshift.integrations.transformers import cache_keyword, get_handle
from actshift.steering import recipes
from actshift.steering.plan import SteeringPlan

PAIRS = [("I love you", "I hate you"), ("the dog is happy", "the dog is sad"),
         ("we love it", "we hate it"), ("good cat", "bad cat")]

KW = cache_keyword(pytest.importorskip("transformers").LlamaForCausalLM)  # "cache" (5.24 on) or "past_key_values"


def last_token_states(model, tok, texts, index):
    """hidden_states[index] at each text's last token, one unpadded forward per text."""
    rows = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            rows.append(model(ids, output_hidden_states=True).hidden_states[index][0, -1])
    return torch.stack(rows)


# --- CAA / PCA -----------------------------------------------------------------------------------------


def test_mean_difference_and_pca_against_numpy_and_sklearn():
    pos, neg = torch.randn(40, 24), torch.randn(40, 24)
    np.testing.assert_allclose(recipes.mean_difference(pos, neg).numpy(),
                               pos.numpy().mean(0) - neg.numpy().mean(0), rtol=1e-5, atol=1e-6)
    u = recipes.pca_direction(pos, neg)
    ref = PCA(n_components=1).fit((pos - neg).double().numpy()).components_[0]
    assert abs(abs(float(np.dot(u.double().numpy(), ref))) - 1) < 1e-6  # same axis, unit norm
    assert float(((pos @ u) > (neg @ u)).float().mean()) >= 0.5  # positives project higher


def test_pca_recovers_a_planted_direction_with_the_right_sign():
    d = 32
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    neg = torch.randn(64, d)
    coeff = 3 + torch.rand(64, 1) * 4  # the pairs differ by varying positive multiples of u
    pos = neg + coeff * u + 0.01 * torch.randn(64, d)
    for center in (True, False):
        got = recipes.pca_direction(pos, neg, center=center)
        assert float(got @ u) > 0.99
        got_neg = recipes.pca_direction(neg, pos, center=center)  # swapped roles flip the sign
        assert float(got_neg @ u) < -0.99


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_caa_and_pca_vectors_from_the_model(arch):
    model, tok = getattr(tiny_lm, arch)(), tiny_lm.tokenizer("left")
    caa = recipes.caa_vectors(model, PAIRS, [0, 1], tokenizer=tok, batch_size=3, progress=False)
    pca = recipes.pca_vectors(model, PAIRS, [0], tokenizer=tok, progress=False)
    pos = last_token_states(model, tok, [p for p, _ in PAIRS], 1)
    neg = last_token_states(model, tok, [n for _, n in PAIRS], 1)
    torch.testing.assert_close(caa[0], pos.mean(0) - neg.mean(0), rtol=1e-5, atol=1e-5)
    ref = PCA(n_components=1).fit((pos - neg).double().numpy()).components_[0]
    assert abs(abs(float(np.dot(pca[0].double().numpy(), ref))) - 1) < 1e-4
    assert sorted(caa) == [0, 1] and caa[1].shape == (32,)
    plans = recipes.plans_from_vectors(caa, strength=4.0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(actshift.steer(x, plans[1], backend="reference"), x + 4.0 * caa[1])


# --- ActAdd ------------------------------------------------------------------------------------------


def test_actadd_vectors_are_the_block_input_difference():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    v = recipes.actadd_vectors(model, tok, "love", "hate", 1)
    with torch.no_grad():
        hp = model(tok("love", return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states[1][0]
        hn = model(tok("hate", return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(v, hp - hn, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number of tokens"):
        recipes.actadd_vectors(model, tok, "I love you", "hate", 1)


def test_actadd_adds_only_at_the_prompt_front_of_each_row():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer("left")
    vectors = torch.randn(2, 32)
    enc = tok(["the cat is very happy", "I love it"], return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    strength = 3.0
    # independent: a pre-hook adding strength·v[j] at the j-th real token of every row
    start = mask.argmax(1)

    def pre_hook(module, args, kwargs):
        h = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        for b in range(h.shape[0]):
            for j in range(vectors.shape[0]):
                h[b, start[b] + j] += strength * vectors[j]
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = h
            return args, kwargs
        return (h,) + args[1:], kwargs

    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hook = model.model.layers[1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with torch.no_grad():
        expected = model(**enc, position_ids=positions).logits
    hook.remove()
    sites = recipes.actadd_sites(vectors, 1, strength=strength, attention_mask=mask)
    with actshift.patch(model, steering=sites, backend="reference"), torch.no_grad():
        got = model(**enc, position_ids=positions).logits
    with torch.no_grad():
        plain = model(**enc, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)
    with pytest.raises(ValueError, match="attention_mask"):
        recipes.actadd_sites(torch.randn(3, 32), 1, attention_mask=torch.tensor([[0, 1, 1]]))


# --- Linear-AcT affine maps -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["quantile", "meanstd"])
def test_fit_affine_recovers_an_exact_affine_relation(method):
    source = torch.randn(200, 16) * torch.rand(16) * 3
    a, b = torch.rand(16) * 2 + 0.1, torch.randn(16)
    target = source[torch.randperm(200)] * a + b  # same distribution as a·x + b, rows unpaired
    scale, bias = recipes.fit_affine(source, target, method)
    torch.testing.assert_close(scale, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias, b, rtol=1e-4, atol=1e-4)


def test_fit_affine_quantile_is_least_squares_of_sorted_values():
    source, target = torch.randn(100, 8), torch.randn(100, 8).exp()
    scale, bias = recipes.fit_affine(source, target, "quantile")
    for j in range(8):  # numpy: a line through the sorted pairs
        slope, icpt = np.polyfit(np.sort(source[:, j].numpy()), np.sort(target[:, j].numpy()), 1)
        assert abs(scale[j].item() - slope) < 1e-4 and abs(bias[j].item() - icpt) < 1e-4
    s2, b2 = recipes.fit_affine(source, target, "meanstd")
    np.testing.assert_allclose(s2.numpy(), target.numpy().std(0) / source.numpy().std(0), rtol=1e-5)
    scale_u, _ = recipes.fit_affine(source, target[:37], "quantile")  # unequal row counts work
    assert scale_u.shape == (8,) and bool(torch.isfinite(scale_u).all())


def test_affine_plan_applies_the_map():
    source, target = torch.randn(50, 8), torch.randn(50, 8) * 2 + 1
    scale, bias = recipes.fit_affine(source, target)
    plan = recipes.affine_plan(source, target)
    x = torch.randn(4, 8)
    torch.testing.assert_close(actshift.steer(x, plan, backend="reference"), x * scale + bias)


# --- neurons -------------------------------------------------------------------------------------------


def test_neuron_scores_and_selection_against_numpy():
    pos, neg = torch.randn(30, 20), torch.randn(50, 20)
    pos[:, 7] += 5
    neg[:, 3] += 4
    p, n = pos.double().numpy(), neg.double().numpy()
    d = (p.mean(0) - n.mean(0)) / np.sqrt((p.var(0) + n.var(0)) / 2)
    np.testing.assert_allclose(recipes.neuron_scores(pos, neg).numpy(), d, rtol=1e-5)
    np.testing.assert_allclose(recipes.neuron_scores(pos, neg, "mean_diff").numpy(), p.mean(0) - n.mean(0), rtol=1e-5)
    assert set(recipes.select_neurons(pos, neg, 2).tolist()) == {3, 7}
    with pytest.raises(ValueError, match="k must be"):
        recipes.select_neurons(pos, neg, 0)


def test_neuron_plan_sets_or_multiplies_the_selected_neurons():
    pos, neg = torch.randn(30, 20), torch.randn(30, 20)
    pos[:, 5] += 6
    x = torch.randn(3, 20)
    y = actshift.steer(x, recipes.neuron_plan(pos, neg, 1, mode="set"), backend="reference")
    torch.testing.assert_close(y[:, 5], pos[:, 5].mean().expand(3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, :5], x[:, :5])
    y = actshift.steer(x, recipes.neuron_plan(pos, neg, 1, mode="multiply", factor=3.0), backend="reference")
    torch.testing.assert_close(y[:, 5], 3 * x[:, 5])


# --- directional ablation and monitors ---------------------------------------------------------------------


def test_ablation_removes_the_direction_from_every_residual_state():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    u = torch.randn(32)
    ids = tok(["the cat is happy"], return_tensors="pt")["input_ids"]
    seen = []  # what layer 0's first norm and the final norm receive: the first and last residual states
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
             for m in (model.model.layers[0].input_layernorm, model.model.norm)]
    with recipes.ablate_direction(model, u, backend="reference"), torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    unit = u / u.norm()
    for h in [*seen, *hs[1:-1]]:  # hidden_states[0] is recorded before layer 0 steers its input
        assert float((h @ unit).abs().max()) < 1e-5
    assert float((hs[0] @ unit).abs().max()) > 1e-3  # the embeddings themselves did have the component
    with pytest.raises(ValueError, match="direction has hidden size 16"):
        recipes.ablate_direction(model, torch.randn(16))


def test_monitor_plan_reads_the_projection():
    v = torch.randn(32)
    (site,) = recipes.monitor_sites({1: v})
    x = torch.randn(5, 32)
    y, mon = actshift.steer(x, site.plan, return_monitors=True, backend="reference")
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(mon[:, 0], x @ (v / v.norm()), rtol=1e-5, atol=1e-5)


# --- CAST -------------------------------------------------------------------------------------------


def test_cast_similarity_matches_the_projector_formula():
    h, c = torch.randn(6, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    P = torch.outer(c, c) / torch.dot(c, c)
    t = torch.tanh(h @ P.T)
    expected = (h * t).sum(1) / (h.norm(dim=1) * t.norm(dim=1))
    torch.testing.assert_close(recipes.cast_similarity(h, c), expected)


def _scores(model, ids, steer_sites=None, **gen):
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0, **gen)
    if steer_sites is None:
        with torch.no_grad():
            return model.generate(ids, **kwargs)
    with actshift.patch(model, steering=steer_sites, backend="reference"), torch.no_grad():
        return model.generate(ids, **kwargs)


def test_cast_steers_only_generations_whose_prompt_matches():
    from actshift.integrations.transformers import SteeringSite

    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    ids = tok(["the cat is happy", "I hate you very"], return_tensors="pt")["input_ids"]  # equal lengths
    c = torch.randn(32)
    h_mean = torch.stack([recipes.extract_activations(model, ids[i:i + 1], 0, pooling="mean", progress=False)[0][0]
                          for i in range(2)])
    sims = recipes.cast_similarity(h_mean, c)
    threshold = float(sims.mean())
    matching = int(sims.argmax())  # compare ">" : only this row meets the condition
    behavior = {1: SteeringPlan(add=torch.randn(32), strength=8.0)}
    with recipes.ConditionalSteering(model, behavior, {0: c}, threshold, compare=">",
                                     backend="reference") as cast, torch.no_grad():
        out = cast.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, pad_token_id=0)
        assert cast.decision.tolist() == [i == matching for i in range(2)]
    other = 1 - matching
    plain = _scores(model, ids[other:other + 1])
    steered = _scores(model, ids[matching:matching + 1],
                      [SteeringSite(plan=behavior[1], layers=[1], positions="generated")])
    for step in range(4):
        torch.testing.assert_close(out.scores[step][other], plain.scores[step][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores[step][matching], steered.scores[step][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.scores[-1][matching], _scores(model, ids[matching:matching + 1]).scores[-1][0])
    assert get_handle(model) is None  # closed: unpatched


# --- dynamic composition -------------------------------------------------------------------------------


def test_compose_applies_the_callbacks_weights_per_row_and_step():
    from transformers import DynamicCache

    model = tiny_lm.llama()
    va, vb = torch.randn(32), torch.randn(32)
    plans = {"a": {0: SteeringPlan(add=va, strength=2.0)}, "b": {1: SteeringPlan(add=vb)}}

    def weights(handle, step):
        first = step.past_length == 0
        return {"a": torch.tensor([1.0, 0.5]) if first else torch.tensor([0.0, 1.0]),
                "b": torch.tensor([0.0, 3.0]) if first else torch.tensor([2.0, 2.0])}

    ids = torch.randint(3, 20, (2, 5))
    nxt = torch.randint(3, 20, (2, 1))

    def run(model):
        cache = DynamicCache()
        with torch.no_grad():
            a = model(ids, **{KW: cache}, use_cache=True).logits
            b = model(nxt, **{KW: cache}, use_cache=True).logits
        return a, b

    handle = recipes.compose(model, plans, weights, backend="reference")
    got = run(model)
    handle.unpatch()
    # independent: forward hooks adding w·λ·v per row, weights switched by hand between the steps
    current = {}

    def hook(v, strength, name):
        return lambda m, a, o: o + (current[name][:, None, None] * strength * v)

    hooks = [model.model.layers[0].register_forward_hook(hook(va, 2.0, "a")),
             model.model.layers[1].register_forward_hook(hook(vb, 1.0, "b"))]
    cache = DynamicCache()
    with torch.no_grad():
        current.update(a=torch.tensor([1.0, 0.5]), b=torch.tensor([0.0, 3.0]))
        a = model(ids, **{KW: cache}, use_cache=True).logits
        current.update(a=torch.tensor([0.0, 1.0]), b=torch.tensor([2.0, 2.0]))
        b = model(nxt, **{KW: cache}, use_cache=True).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got[0], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], b, rtol=1e-5, atol=1e-5)


# --- bad inputs ----------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    with pytest.raises(ValueError, match="pairs is empty"):
        recipes.caa_vectors(model, [], [0], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        recipes.caa_vectors(model, [("a", "b"), ("a",)], [0], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="layers: layer 9 is out of range"):
        recipes.caa_vectors(model, PAIRS, [9], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="must match"):
        recipes.mean_difference(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="positive must be"):
        recipes.pca_direction(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="hidden size"):
        recipes.fit_affine(torch.randn(5, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="method"):
        recipes.fit_affine(torch.randn(5, 8), torch.randn(5, 8), "ot")
    with pytest.raises(ValueError, match="hidden size 16"):
        actshift.patch(model, steering=recipes.plans_from_vectors({0: torch.randn(16)}))
    with pytest.raises(ValueError, match="condition"):
        recipes.ConditionalSteering(model, {1: SteeringPlan(add=torch.randn(32))}, {5: torch.randn(32)}, 0.0)
    with pytest.raises(ValueError, match=r"condition\[0\] has hidden size 8"):
        recipes.ConditionalSteering(model, {1: SteeringPlan(add=torch.randn(32))}, {0: torch.randn(8)}, 0.0)
    assert get_handle(model) is None


# --- properties over odd shapes -----------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_property_pca_is_a_signed_unit_axis_of_the_differences(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    u = recipes.pca_direction(pos, neg, center=False)
    assert abs(float(u.norm()) - 1) < 1e-5
    assert float(((pos @ u) > (neg @ u)).double().mean()) >= 0.5
    diff = (pos - neg).double()
    # the top right singular vector maximizes ‖diff·u‖ over unit vectors: no random unit vector beats it
    r = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    assert float((diff @ u.double()).norm()) >= float((diff @ r).norm()) - 1e-6


@settings(max_examples=30, deadline=None)
@given(ns=st.integers(2, 60), nt=st.integers(2, 60), d=st.integers(1, 33), seed=st.integers(0, 2**16),
       method=st.sampled_from(["quantile", "meanstd"]))
def test_property_affine_map_moves_the_source_mean_to_the_target_mean(ns, nt, d, seed, method):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(ns, d, generator=g) * 2 + 1
    target = torch.randn(nt, d, generator=g).exp()
    scale, bias = recipes.fit_affine(source, target, method)
    assert scale.shape == bias.shape == (d,)
    if method == "meanstd":  # mapped source has exactly the target's mean and std per dimension
        mapped = source.double() * scale.double() + bias.double()
        torch.testing.assert_close(mapped.mean(0), target.double().mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mapped.std(0, unbiased=False), target.double().std(0, unbiased=False),
                                   rtol=1e-4, atol=1e-4)
    else:  # quantile: monotone (non-negative slope), since both quantile sequences are sorted
        assert bool((scale >= 0).all())


def test_persona_monitor_logs_projections_of_prompt_and_generated_tokens():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    v = torch.randn(32)
    ids = tok(["the cat is happy", "I hate you very"], return_tensors="pt")["input_ids"]
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **gen)
    with recipes.PersonaMonitor(model, {0: v}, backend="reference") as mon, torch.no_grad():
        model.generate(ids, **gen)  # a first generation, discarded by the next prefill
        out = model.generate(ids, **gen)
        proj = mon.projections()[0]
    assert torch.equal(out, plain)  # monitoring does not change the generation
    with torch.no_grad():  # independent: one uncached forward over every token the model consumed
        h = model(out[:, :-1], output_hidden_states=True).hidden_states[1]
    assert proj.shape == (2, ids.shape[1] + 2)
    torch.testing.assert_close(proj, h @ (v / v.norm()), rtol=1e-4, atol=1e-4)
    assert get_handle(model) is None
