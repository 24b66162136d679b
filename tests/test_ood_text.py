"""Text classifiers (`*ForSequenceClassification`) as OOD classifiers: the adapter's features and
head reproduce the model's logits, SCALE / AdaSCALE / ODIN run on tokenized batches, and the
input perturbations act on token embeddings of real tokens only. Tiny random models, no downloads."""
import pytest
import torch
import transformers

from actshift.ood import (
    AdaScalePostprocessor,
    HFTextClassifier,
    ODINPostprocessor,
    ScalePostprocessor,
    as_classifier,
    make_postprocessor,
    perturb_input,
    scaled_logits,
)

VOCAB = 50


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def roberta():
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


def batch(padding_side="right", rows=(7, 4, 6), pad_id=0):
    """A padded batch of random tokens (ids >= 3 so no real token is the pad id)."""
    torch.manual_seed(1)
    width = max(rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(rows):
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(3, VOCAB, (n,))
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("make, pad_id, side", [(bert, 0, "right"), (roberta, 1, "right"),
                                                 (llama, 0, "right"), (llama, 0, "left")])
def test_features_and_head_reproduce_the_models_logits(make, pad_id, side):
    model = make()
    inputs = batch(side, pad_id=pad_id)
    clf = as_classifier(model)
    assert isinstance(clf, HFTextClassifier)
    with torch.no_grad():
        z = clf.features(inputs)
        assert z.shape == (3, 32)
        torch.testing.assert_close(clf.head(z), model(**inputs).logits, rtol=1e-5, atol=1e-5)
        # Each row alone, unpadded: padding changes nothing.
        for i in range(3):
            real = inputs["attention_mask"][i].bool()
            alone = clf.features({"input_ids": inputs["input_ids"][i, real][None]})
            torch.testing.assert_close(alone[0], z[i], rtol=1e-4, atol=1e-5)


def test_bert_features_are_the_pooler_output():
    model, inputs = bert(), batch()
    with torch.no_grad():
        pooled = model.bert(**inputs).pooler_output
        torch.testing.assert_close(as_classifier(model).features(inputs), pooled)
        embedded = as_classifier(model).embed(inputs)
        assert set(embedded) == {"inputs_embeds", "attention_mask"}
        torch.testing.assert_close(as_classifier(model).features(embedded), pooled)


def test_scale_on_a_tokenized_batch_matches_the_formula_on_the_pooler_output():
    model, inputs = bert(), batch()
    pred, conf = ScalePostprocessor(85).postprocess(model, inputs)
    with torch.no_grad():
        z = model.bert(**inputs).pooler_output
        k = 32 - round(32 * 0.85)
        r = z.sum(1) / z.topk(k, dim=1).values.sum(1)
        logits = torch.exp(r)[:, None] * (z @ model.classifier.weight.t()) + model.classifier.bias
    torch.testing.assert_close(conf, torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, logits.argmax(1))
    torch.testing.assert_close(logits, scaled_logits(z, model.classifier.weight, model.classifier.bias, 85))


def test_adascale_perturbs_the_token_embeddings_of_real_tokens_only():
    model, inputs = bert(), batch()
    clf = as_classifier(model)
    fraction, epsilon = 0.05, 0.5
    z, perturbed = perturb_input(clf, inputs, fraction, epsilon)
    emb = model.get_input_embeddings()(inputs["input_ids"]).detach()
    delta = perturbed["inputs_embeds"] - emb
    real = inputs["attention_mask"].bool()
    assert bool((delta[~real] == 0).all())  # padding untouched
    # The gradient through the model's own forward (not the adapter's hook).
    e = emb.clone().requires_grad_(True)
    model(inputs_embeds=e, attention_mask=inputs["attention_mask"]).logits.max(1).values.sum().backward()
    for i, n in enumerate(real.sum(1).tolist()):
        g = e.grad[i][real[i]].flatten()
        moved = delta[i][real[i]].flatten() != 0
        assert int(moved.sum()) == int(n * 32 * fraction)  # int(M·o), M = real elements
        # the moved elements are the least attributed ones, each by ε·sign(g)
        assert float(g[moved].abs().max()) <= float(g[~moved].abs().min())
        torch.testing.assert_close(delta[i][real[i]].flatten()[moved], epsilon * torch.sign(g[moved]))
    torch.testing.assert_close(z, clf.features(inputs))


def test_adascale_and_odin_run_end_to_end_on_text():
    model = bert()
    id_batches = [{"data": batch(rows=(5, 6, 7)), "label": torch.tensor([0, 1, 2])} for _ in range(2)]
    x = batch(rows=(6, 3, 7))
    pp = AdaScalePostprocessor("a")
    pp.setup(model, {"val": id_batches})
    pred, conf = pp.postprocess(model, x)
    assert pred.shape == conf.shape == (3,) and bool(torch.isfinite(conf).all())
    odin = ODINPostprocessor(1000.0, 0.0014)
    moved = odin.perturb(as_classifier(model), x)
    emb = model.get_input_embeddings()(x["input_ids"])
    assert bool(((moved["inputs_embeds"] - emb)[x["attention_mask"] == 0] == 0).all())
    assert bool(((moved["inputs_embeds"] - emb)[x["attention_mask"] == 1].abs() > 0).all())
    pred, conf = odin.postprocess(model, x)
    assert bool(((conf > 0) & (conf <= 1)).all())
    for method in ("knn", "vim", "mds"):  # the feature-space methods need no input gradient
        pp = make_postprocessor(method, **{"knn": {"K": 2}, "vim": {"dim": 8}}.get(method, {}))
        pp.setup(model, {"train": id_batches})
        assert bool(torch.isfinite(pp.postprocess(model, x)[1]).all())


def test_loaders_may_yield_tokenizer_outputs_with_labels():
    model = bert()
    plain = [{**batch(rows=(5, 6, 7)), "labels": torch.tensor([0, 1, 2])} for _ in range(2)]
    openood = [{"data": {k: v for k, v in b.items() if k != "labels"}, "label": b["labels"]} for b in plain]
    x = batch(rows=(6, 3, 7))
    confs = []
    for loader in (plain, openood):
        pp = make_postprocessor("mds")
        pp.setup(model, {"train": loader})
        confs.append(pp.postprocess(model, x)[1])
    torch.testing.assert_close(confs[0], confs[1])


def test_text_adapter_bad_inputs():
    clf = as_classifier(bert())
    with pytest.raises(TypeError, match="x must be"):
        clf.features(["a sentence"])

    class TanhHeadForSequenceClassification(transformers.BertForSequenceClassification):
        pass

    model = TanhHeadForSequenceClassification(bert().config)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32, 3))
    with pytest.raises(TypeError, match="final layer"):
        as_classifier(model)
