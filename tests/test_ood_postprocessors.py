"""Postprocessors and adapters on tiny transformers ResNet/ViT, an OpenOOD-style net, a FeatureClassifier."""

import numpy as np
import pytest
import torch
import transformers

import actshift
from actshift.ood import (
    METHODS,
    AdaScalePostprocessor,
    ASHPostprocessor,
    EnergyPostprocessor,
    FeatureClassifier,
    HFResNetClassifier,
    HFViTClassifier,
    OpenOODClassifier,
    ReActPostprocessor,
    ScalePostprocessor,
    as_classifier,
    auroc,
    make_postprocessor,
)
from actshift.ood.postprocessors import id_inputs, split_batch


class OpenOODNet(torch.nn.Module):
    """The OpenOOD network contract: forward(x, return_feature) and get_fc_layer()."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 24, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.fc = torch.nn.Linear(24, 5)

    def forward(self, x, return_feature=False):
        feature = self.body(x).flatten(1)
        logits = self.fc(feature)
        return (logits, feature) if return_feature else logits

    def get_fc_layer(self):
        return self.fc


def hf_resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return transformers.ResNetForImageClassification(config).eval(), (3, 16, 16)


def hf_vit():
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(config).eval(), (3, 16, 16)


def feature_classifier():
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 40), torch.nn.ReLU())
    return FeatureClassifier(body, torch.nn.Linear(40, 5)), (3, 4, 4)


def openood_net():
    return OpenOODNet().eval(), (3, 8, 8)


NETS = {"hf_resnet": hf_resnet, "hf_vit": hf_vit, "feature": feature_classifier, "openood": openood_net}


@pytest.fixture(scope="module", params=list(NETS))
def net_and_shape(request):
    torch.manual_seed(0)
    return NETS[request.param]()


def plain_logits(net, x):
    if isinstance(net, transformers.PreTrainedModel):
        return net(x).logits
    return net(x)


@pytest.mark.parametrize(
    "make, adapter",
    [
        (hf_resnet, HFResNetClassifier),
        (hf_vit, HFViTClassifier),
        (feature_classifier, FeatureClassifier),
        (openood_net, OpenOODClassifier),
    ],
)
def test_adapters_reproduce_the_models_logits(make, adapter):
    net, shape = make()
    x = torch.randn(4, *shape)
    clf = as_classifier(net)
    assert isinstance(clf, adapter)
    with torch.no_grad():
        z = clf.features(x)
        assert z.dim() == 2 and z.shape[1] == clf.head.in_features
        torch.testing.assert_close(clf.head(z), plain_logits(net, x))


# KNN's k and ViM's principal dimension must fit 12 ID samples of small features.
SMALL_DATA = {"knn": {"K": 3}, "vim": {"dim": 4}}


@pytest.mark.parametrize("method", METHODS)
def test_setup_postprocess_and_hyperparameter_round_trip(net_and_shape, method):
    net, shape = net_and_shape
    val = [{"data": torch.randn(6, *shape), "label": torch.zeros(6, dtype=torch.long)} for _ in range(2)]
    x = torch.randn(5, *shape)
    pp = make_postprocessor(method, **SMALL_DATA.get(method, {}))
    pp.setup(net, {"val": val}, {})
    pred, conf = pp.postprocess(net, x)
    assert pred.shape == (5,) and pred.dtype == torch.long and int(pred.max()) < 5
    assert conf.shape == (5,) and conf.dtype == torch.float32 and bool(torch.isfinite(conf).all())

    hyper = pp.get_hyperparam()
    assert list(pp.args_dict) == [f"{name}_list" for name in pp.hyperparameters]
    assert all(key.endswith("_list") and isinstance(values, list) for key, values in pp.args_dict.items())
    first = [values[0] for values in pp.args_dict.values()]  # OpenOOD's APS sets one sweep point
    pp.set_hyperparam(first)
    assert pp.get_hyperparam() == first
    pp.set_hyperparam(hyper)
    assert pp.get_hyperparam() == hyper
    pred2, conf2 = pp.postprocess(net, x)
    assert torch.equal(pred2, pred)
    torch.testing.assert_close(conf2, conf)


def test_msp_and_energy_scores():
    clf, shape = feature_classifier()
    x = torch.randn(7, *shape)
    with torch.no_grad():
        logits = clf(x)
    pred, conf = make_postprocessor("msp").postprocess(clf, x)
    torch.testing.assert_close(conf, torch.softmax(logits, 1).max(1).values)
    assert torch.equal(pred, logits.argmax(1))
    _, conf = EnergyPostprocessor(temperature=2.0).postprocess(clf, x)
    torch.testing.assert_close(conf, 2.0 * torch.logsumexp(logits / 2.0, 1))


def test_shaping_postprocessors_score_the_energy_of_shaped_logits():
    clf, shape = feature_classifier()
    x = torch.randn(7, *shape)
    with torch.no_grad():
        z = clf.features(x)
        for pp, shaped in (
            (ASHPostprocessor("p", 70), actshift.percentile_scale(z, 70, "ash_p")),
            (ASHPostprocessor("b"), actshift.percentile_scale(z, 65, "ash_b")),
            (ASHPostprocessor("s"), actshift.percentile_scale(z, 90, "ash_s")),
            (ScalePostprocessor(), actshift.percentile_scale(z, 85, "scale")),
        ):
            logits = clf.head(shaped)
            pred, conf = pp.postprocess(clf, x)
            assert torch.equal(pred, logits.argmax(1))
            torch.testing.assert_close(conf, torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_form", ["dict", "tuple"])
def test_react_clip_is_the_percentile_of_all_id_activations(batch_form):
    clf, shape = feature_classifier()
    xs = [torch.randn(9, *shape) for _ in range(3)]
    val = [{"data": x} if batch_form == "dict" else (x, torch.zeros(9)) for x in xs]
    pp = ReActPostprocessor()
    pp.setup(clf, {"val": val}, {})
    with torch.no_grad():
        activations = torch.cat([clf.features(x) for x in xs]).flatten().numpy()
    for percentile in (90, 85, 99, 12.5):
        pp.set_hyperparam([percentile])
        assert pp.clip == pytest.approx(float(np.percentile(activations, percentile)), rel=1e-6, abs=1e-7)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        logits = clf.head(clf.features(x).clamp(max=pp.clip))
    torch.testing.assert_close(pp.postprocess(clf, x)[1], torch.logsumexp(logits, 1))


def test_id_statistics_fall_back_to_the_train_loader():
    clf, shape = feature_classifier()
    pp = ReActPostprocessor()
    pp.setup(clf, {"train": [(torch.randn(8, *shape), torch.zeros(8))]}, {})
    assert pp.clip is not None
    with pytest.raises(ValueError, match="id_loader_dict"):
        pp.setup(clf, {"test": []}, {})
    with pytest.raises(TypeError, match="id_loader_dict"):
        pp.setup(clf, [], {})


def planted_classifier():
    """Features = the input (4 blocks of 8); class c sums block c."""
    head = torch.nn.Linear(32, 4)
    with torch.no_grad():
        head.weight.copy_(torch.kron(torch.eye(4), torch.ones(1, 8)))
        head.bias.zero_()
    return FeatureClassifier(lambda x: x, head)


def planted_inputs(n, in_distribution, generator):
    """The regime activation shaping assumes. ID: one class block broadly active (1 to 1.5) over a
    0 to 0.3 background, so much mass lies outside the top k (large r) and the logits are large.
    OOD: two isolated spikes (1.5 to 2.5), nothing else (r = 1, small logits)."""
    if in_distribution:
        x = 0.3 * torch.rand(n, 32, generator=generator)
        block = torch.randint(0, 4, (n,), generator=generator)
        for i, b in enumerate(block.tolist()):
            x[i, 8 * b : 8 * b + 8] += 1.0 + 0.5 * torch.rand(8, generator=generator)
        return x
    x = torch.zeros(n, 32)
    spikes = torch.rand(n, 32, generator=generator).argsort(dim=1)[:, :2]
    return x.scatter_(1, spikes, 1.5 + torch.rand(n, 2, generator=generator))


# MDS needs labels and ViM's residual space is not what separates this case; test_ood_posthoc.py
# checks both on cases they provably separate.
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("mds", "vim")])
def test_id_gets_higher_confidence_on_a_planted_easy_case(method):
    g = torch.Generator().manual_seed(0)
    clf = planted_classifier()
    val, x_id, x_ood = planted_inputs(64, True, g), planted_inputs(64, True, g), planted_inputs(64, False, g)
    pp = make_postprocessor(method)
    pp.setup(clf, {"val": [(val, None)]}, {})
    id_conf, ood_conf = pp.postprocess(clf, x_id)[1], pp.postprocess(clf, x_ood)[1]
    assert auroc(id_conf, ood_conf) > 0.95


def test_inference_returns_numpy_arrays_over_a_loader():
    clf, shape = feature_classifier()
    loader = [
        (torch.randn(4, *shape), torch.arange(4)),
        {"data": torch.randn(3, *shape), "label": torch.arange(3)},
    ]
    pred, conf, label = make_postprocessor("energy").inference(clf, loader)
    assert pred.shape == conf.shape == label.shape == (7,)
    assert label.tolist() == [0, 1, 2, 3, 0, 1, 2]
    with pytest.raises(ValueError, match="label"):
        make_postprocessor("energy").inference(clf, [(torch.randn(2, *shape),)])


def test_split_batch_forms():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch({"data": x, "label": y})[1] is y
    assert split_batch((x, y))[0] is x and split_batch([x])[1] is None
    with pytest.raises(ValueError, match="data"):
        split_batch({"image": x})
    with pytest.raises(TypeError, match="batch"):
        split_batch(x)
    assert next(iter(id_inputs({"val": [(x, y)]}, torch.device("cpu")))) is x


def test_mismatched_head_is_a_value_error_naming_net():
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 40), torch.nn.ReLU())
    clf = FeatureClassifier(body, torch.nn.Linear(41, 5))
    x = torch.randn(2, 48)
    for method in METHODS:
        pp = make_postprocessor(method)
        with pytest.raises(ValueError, match="net"):  # from setup (ReAct, AdaSCALE) or postprocess
            pp.setup(clf, {"val": [(x, None)]}, {})
            pp.postprocess(clf, x)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: make_postprocessor("ash"), ValueError, "method"),
        (lambda: ASHPostprocessor("x"), ValueError, "variant"),
        (lambda: AdaScalePostprocessor("x"), ValueError, "variant"),
        (lambda: AdaScalePostprocessor("a", percentile=[85, 60]), ValueError, "p_min"),
        (lambda: AdaScalePostprocessor("a", percentile=85), ValueError, "percentile"),
        (lambda: ScalePostprocessor(percentile=100), ValueError, "percentile"),
        (lambda: ASHPostprocessor("p", percentile=0), ValueError, "percentile"),
        (lambda: ReActPostprocessor(percentile=-1), ValueError, "percentile"),
        (lambda: EnergyPostprocessor(temperature=0), ValueError, "temperature"),
        (lambda: ScalePostprocessor().set_hyperparam([80, 90]), ValueError, "hyperparam"),
        (lambda: as_classifier(torch.nn.Linear(3, 3)), TypeError, "net"),
        (lambda: FeatureClassifier(lambda x: x, torch.nn.Conv1d(1, 1, 1)), TypeError, "head"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_react_needs_setup():
    clf, shape = feature_classifier()
    with pytest.raises(RuntimeError, match="setup"):
        ReActPostprocessor().postprocess(clf, torch.randn(2, *shape))
