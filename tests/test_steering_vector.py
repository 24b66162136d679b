"""SteeringVector (repeng-style arithmetic, plans, apply/remove, GGUF as repeng writes and reads it),
aggregators (mean, PCA, logistic regression against scikit-learn) and contrastive-pair datasets:
each checked against an independent computation on tiny random models."""
import gguf
import numpy as np
import pytest
import tiny_lm
import torch
from sklearn.linear_model import LogisticRegression

import actshift
from actshift.steering import (
    SteeringVector,
    aggregate,
    load,
    logistic_direction,
    make_pairs,
    recipes,
    save,
    truncated_suffixes,
)

PAIRS = [("I love you", "I hate you"), ("the dog is happy", "the dog is sad"),
         ("we love it", "we hate it"), ("good cat", "bad cat")]


def vec(d=8, **layers):
    return SteeringVector({int(k[1:]): v for k, v in layers.items()}, model_type="llama")


# --- arithmetic -----------------------------------------------------------------------------------


def combine_dicts(a: dict, b: dict, coeff: float) -> dict:
    """repeng's ControlVector._helper_combine, restated on plain dicts of numpy arrays."""
    out = {k: v.copy() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + coeff * v if k in out else coeff * v
    return out


def as_np(v: SteeringVector) -> dict:
    return {k: t.numpy() for k, t in v.items()}


def test_arithmetic_follows_repeng_per_layer_semantics():
    a, b, c = torch.randn(3, 8).unbind()
    d = torch.randn(8)
    v1, v2 = vec(l1=a, l2=b), vec(l2=c, l3=d)
    na, nb = as_np(v1), as_np(v2)
    for got, ref in [
        (v1 + 0.5 * v2, combine_dicts(na, {k: 0.5 * x for k, x in nb.items()}, 1.0)),
        (v1 - v2, combine_dicts(na, nb, -1.0)),
        (v2 + v1, combine_dicts(nb, na, 1.0)),
        (-v1, {k: -x for k, x in na.items()}),
        (v1 * 3, {k: 3 * x for k, x in na.items()}),
        (v1 / 4, {k: x / 4 for k, x in na.items()}),
        (v1 - v1, {k: 0 * x for k, x in na.items()}),
    ]:
        assert got.layers == sorted(ref)
        for k in ref:
            np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-6, atol=1e-7)
    assert (v1 + 0.5 * v2).layers == [1, 2, 3]  # union: layer 3 only in v2 keeps 0.5·d
    assert 2 * v1 == v1 * 2 == v1 + v1 and v1 != -v1
    assert (v1 + v2).model_type == "llama"


def test_vector_is_a_read_only_copy_and_a_mapping():
    t = torch.randn(8)
    v = SteeringVector({2: t, 0: torch.randn(8, dtype=torch.float64)})
    t.zero_()
    assert float(v[2].abs().sum()) > 0 and v[0].dtype == torch.float32
    assert list(v) == [0, 2] and len(v) == 2 and 2 in v and v.hidden_size == 8
    assert v.norms() == {k: pytest.approx(float(x.norm())) for k, x in v.items()}
    assert "norms={0:" in repr(v) and "hidden_size=8" in repr(v)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SteeringVector({}), ValueError, "directions"),
        (lambda: SteeringVector({-1: torch.randn(4)}), ValueError, "non-negative"),
        (lambda: SteeringVector({0: torch.randn(2, 4)}), TypeError, "directions\\[0\\]"),
        (lambda: SteeringVector({0: torch.tensor([1.0, float("nan")])}), ValueError, "finite"),
        (lambda: SteeringVector({0: torch.randn(4), 1: torch.randn(5)}), ValueError, "hidden size"),
        (lambda: SteeringVector({0: torch.randn(4)}, site="logits"), ValueError, "site"),
        (lambda: vec(l0=torch.randn(4)) + SteeringVector({0: torch.randn(5)}), ValueError, "hidden sizes"),
        (lambda: vec(l0=torch.randn(4)) + SteeringVector({0: torch.randn(4)}, site="mlp_output"), ValueError, "sites"),
        (lambda: vec(l0=torch.randn(4)) + SteeringVector({0: torch.randn(4)}, model_type="gpt2"), ValueError, "models"),
        (lambda: vec(l0=torch.randn(4)) * "2", TypeError, "multiply"),
        (lambda: vec(l0=torch.randn(4)) + 1.0, TypeError, "unsupported operand"),
        (lambda: vec(l0=torch.randn(4)) * float("inf"), ValueError, "finite"),
        (lambda: vec(l0=torch.randn(4)) / 0, ZeroDivisionError, "zero"),
    ],
)
def test_bad_vectors_and_operands(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- use ------------------------------------------------------------------------------------------


def logits_with_hooks(model, ids, vectors: dict, multiplier: float):
    """Adds multiplier·v to each block's output with plain forward hooks (the independent path)."""
    def hook(v):
        def add(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + multiplier * v,) + output[1:]
            return output + multiplier * v
        return add

    handles = [model.model.layers[k].register_forward_hook(hook(v)) for k, v in vectors.items()]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_apply_with_a_multiplier_and_remove():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    ids = tok("the cat is happy", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
    v = vec(l0=torch.randn(32), l1=torch.randn(32))
    expected = logits_with_hooks(model, ids, dict(v), -2.5)
    with v.apply(model, multiplier=-2.5):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)  # removed on leaving the block
    handle = (0.5 * v).apply(model, 2.0)  # 0.5·v at multiplier 2 is v at 1
    with torch.no_grad():
        got = model(ids).logits
    handle.unpatch()
    torch.testing.assert_close(got, logits_with_hooks(model, ids, dict(v), 1.0), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)
    with pytest.raises(ValueError, match="layers"):
        vec(l5=torch.randn(32)).apply(model)
    with pytest.raises(ValueError, match="hidden size"):
        vec(l0=torch.randn(16)).apply(model)


def test_plans_and_sites_add_strength_times_vector():
    v = vec(l1=torch.randn(8), l3=torch.randn(8))
    x = torch.randn(5, 8)
    for layer, plan in v.plans(3.0).items():
        torch.testing.assert_close(actshift.steer(x, plan, backend="reference"), x + 3.0 * v[layer])
    sites = v.sites(2.0, positions="generated", name="mood")
    assert [s.layers for s in sites] == [[1], [3]] and {s.site for s in sites} == {"block_output"}
    assert {s.positions for s in sites} == {"generated"} and {s.name for s in sites} == {"mood"}


# --- files ----------------------------------------------------------------------------------------


def write_like_repeng(path, model_type: str, directions: dict) -> None:
    """A GGUF written the way repeng's ControlVector.export_gguf writes one: arch "controlvector",
    model_hint, layer_count, then direction.<layer> for each numpy array in dict order, as-is."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, array in directions.items():
        writer.add_tensor(f"direction.{layer}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_like_repeng(path) -> tuple[str, dict]:
    """What repeng's ControlVector.import_gguf extracts: the model_hint field and direction.<k>."""
    reader = gguf.GGUFReader(str(path))
    hint = str(bytes(reader.get_field("controlvector.model_hint").parts[-1]), encoding="utf-8")
    return hint, {int(t.name.split(".")[1]): np.array(t.data) for t in reader.tensors if t.name.startswith("direction.")}


def test_imports_repeng_files_including_fp64_and_descending_layers(tmp_path):
    rng = np.random.default_rng(0)
    # repeng trains layers -1, -2, ... (stored as L-1, L-2, ..., so descending); its arithmetic with
    # numpy float64 scalars turns a direction into fp64, which it writes unchanged.
    directions = {3: rng.standard_normal(16).astype(np.float32),
                  2: np.float64(0.5) * rng.standard_normal(16).astype(np.float32),
                  1: rng.standard_normal(16).astype(np.float16)}
    assert directions[2].dtype == np.float64
    write_like_repeng(tmp_path / "repeng.gguf", "mistral", directions)
    v = SteeringVector.from_gguf(tmp_path / "repeng.gguf")
    assert v.layers == [1, 2, 3] and v.model_type == "mistral"
    for layer, array in directions.items():
        np.testing.assert_allclose(v[layer].numpy(), array.astype(np.float32), rtol=1e-7)


def test_exports_what_repeng_reads_and_round_trips(tmp_path):
    v = vec(l1=torch.randn(8), l4=torch.randn(8))
    v.to_gguf(tmp_path / "ours.gguf")
    hint, directions = read_like_repeng(tmp_path / "ours.gguf")
    assert hint == "llama" and sorted(directions) == [1, 4]
    for layer in v:
        assert directions[layer].dtype == np.float32
        np.testing.assert_array_equal(directions[layer], v[layer].numpy())
    assert SteeringVector.from_gguf(tmp_path / "ours.gguf") == v
    save(tmp_path / "v.safetensors", v, method="caa")  # a mapping: the safetensors writer takes it too
    data, _ = load(tmp_path / "v.safetensors")
    assert SteeringVector(data, model_type="llama") == v
    with pytest.raises(ValueError, match="block outputs"):
        SteeringVector({1: torch.randn(8)}, site="mlp_output").to_gguf(tmp_path / "x.gguf", model_hint="llama")


# --- aggregators ----------------------------------------------------------------------------------


def sklearn_logistic(pos, neg, C):
    """steering-vectors' logistic_aggregator: pairs centered on their midpoint, labels ±1, no
    intercept, scikit-learn's L2 logistic regression, unit-normalized coefficients."""
    mid = (pos + neg) / 2
    x = torch.cat([pos - mid, neg - mid]).double().numpy()
    y = np.r_[np.ones(len(pos)), -np.ones(len(neg))]
    coef = LogisticRegression(fit_intercept=False, C=C, tol=1e-12, max_iter=100000).fit(x, y).coef_[0]
    return coef / np.linalg.norm(coef)


@pytest.mark.parametrize("n, d, C", [(40, 16, 1.0), (12, 64, 1.0), (30, 8, 0.05), (20, 32, 20.0)])
def test_logistic_direction_matches_sklearn(n, d, C):
    torch.manual_seed(n + d)
    neg = torch.randn(n, d)
    pos = neg + 0.7 * torch.randn(d) + 0.5 * torch.randn(n, d)
    got = logistic_direction(pos, neg, C=C)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(got.double().numpy(), sklearn_logistic(pos, neg, C), atol=2e-5)


def test_aggregators_recover_a_planted_direction():
    d = 24
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    neg = torch.randn(50, d)
    pos = neg + (2 + torch.rand(50, 1)) * u + 0.05 * torch.randn(50, d)
    for name in ("mean", "pca", "logistic"):
        v = aggregate(pos, neg, name)
        assert float(torch.nn.functional.cosine_similarity(v, u, dim=0)) > 0.99, name
    torch.testing.assert_close(aggregate(pos, neg, lambda p, n: (p - n).median(0).values), (pos - neg).median(0).values)
    with pytest.raises(ValueError, match="aggregator"):
        aggregate(pos, neg, "median")
    with pytest.raises(ValueError, match="aggregator"):
        aggregate(pos, neg, lambda p, n: p)
    with pytest.raises(ValueError, match="identical"):
        logistic_direction(pos, pos)
    with pytest.raises(ValueError, match="C"):
        logistic_direction(pos, neg, C=0)


@pytest.mark.parametrize("aggregator", ["mean", "pca", "logistic"])
def test_train_reads_the_model_and_aggregates(aggregator):
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer("left")
    v = SteeringVector.train(model, PAIRS, [0, 1], tokenizer=tok, aggregator=aggregator, batch_size=3)
    assert v.layers == [0, 1] and v.model_type == "llama" and v.hidden_size == 32
    pos, neg = recipes._contrastive(model, PAIRS, [0, 1], tok, "last", 8, False)
    if aggregator == "mean":
        torch.testing.assert_close(v[1], recipes.caa_vectors(model, PAIRS, [1], tokenizer=tok, progress=False)[1])
    elif aggregator == "pca":
        torch.testing.assert_close(v[0], recipes.pca_vectors(model, PAIRS, [0], tokenizer=tok, progress=False)[0])
    else:
        np.testing.assert_allclose(v[1].double().numpy(), sklearn_logistic(pos[1], neg[1], 1.0), atol=2e-5)


# --- datasets -------------------------------------------------------------------------------------


def test_make_pairs_without_a_chat_template():
    pairs = make_pairs("Act {persona}.", ["happy", "glad"], ["sad", "down"], ["I", "I feel"],
                       user_tag="[INST]", assistant_tag="[/INST]")
    assert pairs == [
        ("[INST] Act happy. [/INST] I", "[INST] Act sad. [/INST] I"),
        ("[INST] Act glad. [/INST] I", "[INST] Act down. [/INST] I"),
        ("[INST] Act happy. [/INST] I feel", "[INST] Act sad. [/INST] I feel"),
        ("[INST] Act glad. [/INST] I feel", "[INST] Act down. [/INST] I feel"),
    ]
    assert make_pairs("be {persona}", ["good"], ["bad"]) == [("be good", "be bad")]


def test_make_pairs_with_a_chat_template_and_truncated_suffixes():
    tok = tiny_lm.tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    suffixes = truncated_suffixes(["I love you", "we hate"], tok)
    assert suffixes == ["I", "I love", "we"]
    pairs = make_pairs("you are {persona}", ["good"], ["bad"], suffixes[:2], tokenizer=tok, system="be brief")
    assert pairs == [
        ("<system>be brief</system><user>you are good</user><assistant>I",
         "<system>be brief</system><user>you are bad</user><assistant>I"),
        ("<system>be brief</system><user>you are good</user><assistant>I love",
         "<system>be brief</system><user>you are bad</user><assistant>I love"),
    ]
    assert truncated_suffixes(["I love you so"], tok, max_tokens=2) == ["I", "I love"]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: make_pairs("no field", ["a"], ["b"]), ValueError, "persona"),
        (lambda: make_pairs("{persona}", ["a", "b"], ["c"]), ValueError, "same length"),
        (lambda: make_pairs("{persona}", "a", ["c"]), ValueError, "positive_personas"),
        (lambda: make_pairs("{persona}", ["a"], ["c"], []), ValueError, "suffixes"),
        (lambda: make_pairs("{persona}", ["a"], ["c"], tokenizer=tiny_lm.tokenizer()), ValueError, "chat_template"),
        (lambda: make_pairs("{persona}", ["a"], ["c"], system="s"), ValueError, "system"),
        (lambda: truncated_suffixes(["I"], tiny_lm.tokenizer()), ValueError, "single token"),
    ],
)
def test_dataset_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
