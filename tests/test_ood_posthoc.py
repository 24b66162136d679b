"""ODIN, Mahalanobis, KNN, ViM and GEN: each score against an independent re-computation (numpy,
scipy, scikit-learn's covariance and neighbours, OpenOOD's numpy recipe for ViM), separation on
synthetic data where the method provably separates, metrics against scikit-learn, bad inputs."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from actshift.ood import (
    FeatureClassifier,
    GENPostprocessor,
    KNNPostprocessor,
    MahalanobisPostprocessor,
    ODINPostprocessor,
    ViMPostprocessor,
    auroc,
    make_postprocessor,
    ood_metrics,
)


def linear_classifier(d=16, classes=4, seed=0):
    """Features = the input itself, so every score has a closed form in numpy."""
    torch.manual_seed(seed)
    return FeatureClassifier(lambda x: x, torch.nn.Linear(d, classes).double())


def head_np(clf):
    return clf.head.weight.detach().numpy(), clf.head.bias.detach().numpy()


def gaussian_classes(n, means, scale, rng):
    """n samples per class around each mean, with labels."""
    x = np.concatenate([m + scale * rng.standard_normal((n, means.shape[1])) for m in means])
    return torch.from_numpy(x), torch.arange(len(means)).repeat_interleave(n)


def check_metrics_against_sklearn(id_conf, ood_conf):
    """Our AUROC is sklearn's roc_auc_score with ID as the positive class."""
    id_conf, ood_conf = id_conf.double().numpy(), ood_conf.double().numpy()
    labels = np.r_[np.ones(len(id_conf)), np.zeros(len(ood_conf))]
    ref = roc_auc_score(labels, np.r_[id_conf, ood_conf])
    assert auroc(id_conf, ood_conf) == pytest.approx(ref, abs=1e-12)
    assert ood_metrics(id_conf, ood_conf)["AUROC"] == pytest.approx(ref, abs=1e-12)
    return ref


# --- GEN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, M", [(0.1, 100), (0.5, 2), (2.0, 3)])
def test_gen_score_is_the_generalized_entropy_of_the_top_m_probabilities(gamma, M):
    clf = linear_classifier()
    x = torch.randn(9, 16, dtype=torch.float64)
    pred, conf = GENPostprocessor(gamma, M).postprocess(clf, x)
    p = softmax(clf.head(x).detach().numpy(), axis=1)
    top = np.sort(p, axis=1)[:, -M:]  # numpy's slice caps M at the class count, as OpenOOD's does
    np.testing.assert_allclose(conf.numpy(), -(top**gamma * (1 - top) ** gamma).sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(pred, torch.from_numpy(p.argmax(1)))


def test_gen_separates_confident_from_uniform_predictions():
    clf = linear_classifier()
    w, _ = head_np(clf)
    rng = np.random.default_rng(0)
    # ID: far along one class's weight row (a peaked softmax); OOD: near the origin (flat softmax).
    x_id = torch.from_numpy(20 * w[rng.integers(0, 4, 64)] + 0.1 * rng.standard_normal((64, 16)))
    x_ood = torch.from_numpy(0.01 * rng.standard_normal((64, 16)))
    pp = GENPostprocessor()
    assert check_metrics_against_sklearn(pp.postprocess(clf, x_id)[1], pp.postprocess(clf, x_ood)[1]) > 0.99


# --- ODIN -----------------------------------------------------------------------------------------


def odin_numpy(w, b, x, temperature, noise, std=None):
    """Closed form for logits = W x + b: ∇x CE(l/T, ŷ) = Wᵀ(softmax(l/T) − onehot(ŷ)) / (T·N)."""
    flat = x.reshape(len(x), -1)
    logits = flat @ w.T + b
    onehot = np.eye(w.shape[0])[logits.argmax(1)]
    grad = ((softmax(logits / temperature, axis=1) - onehot) @ w / (temperature * len(x))).reshape(x.shape)
    step = np.where(grad >= 0, 1.0, -1.0)
    if std is not None:
        step = step / np.asarray(std).reshape(1, -1, *([1] * (x.ndim - 2)))
    x_tilde = x - noise * step
    p = softmax((x_tilde.reshape(len(x), -1) @ w.T + b) / temperature, axis=1)
    return p.argmax(1), p.max(1), x_tilde


@pytest.mark.parametrize("temperature, noise", [(1000.0, 0.0014), (1.0, 0.05), (10.0, 0.0)])
def test_odin_matches_the_closed_form_gradient_step(temperature, noise):
    clf = linear_classifier()
    x = torch.randn(8, 16, dtype=torch.float64)
    pred, conf = ODINPostprocessor(temperature, noise).postprocess(clf, x)
    ref_pred, ref_conf, _ = odin_numpy(*head_np(clf), x.numpy(), temperature, noise)
    np.testing.assert_allclose(conf.numpy(), ref_conf, rtol=1e-6, atol=1e-9)
    assert torch.equal(pred, torch.from_numpy(ref_pred))


def test_odin_divides_by_the_input_std_and_moves_zero_gradients_by_minus_noise():
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 3).double()
    clf = FeatureClassifier(lambda x: x[:, :2].flatten(1), head)  # channel 2 never reaches the head
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    std = [0.5, 0.25, 2.0]
    pp = ODINPostprocessor(10.0, 0.01, input_std=std)
    x_tilde = pp.perturb(clf, x)
    # Channel 2 has a zero gradient: OpenOOD's sign(≥ 0) = +1, so it moves by −noise/std.
    torch.testing.assert_close(x_tilde[:, 2], x[:, 2] - 0.01 / 2.0)
    w = np.zeros((3, 18))
    w[:, :12] = head.weight.detach().numpy()
    _, ref_conf, ref_x = odin_numpy(w, head.bias.detach().numpy(), x.numpy(), 10.0, 0.01, std)
    np.testing.assert_allclose(x_tilde.numpy(), ref_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pp.postprocess(clf, x)[1].numpy(), ref_conf, rtol=1e-6)


# --- Mahalanobis ----------------------------------------------------------------------------------


def test_mahalanobis_matches_sklearn_tied_covariance():
    rng = np.random.default_rng(1)
    means = 3 * rng.standard_normal((4, 16))
    x, y = gaussian_classes(30, means, rng.uniform(0.5, 2.0, 16), rng)
    clf = linear_classifier()
    pp = MahalanobisPostprocessor()
    pp.setup(clf, {"train": [(x[i::3], y[i::3]) for i in range(3)]})
    feats, labels = x.numpy(), y.numpy()
    mu = np.stack([feats[labels == c].mean(0) for c in range(4)])
    precision = EmpiricalCovariance(assume_centered=False).fit(feats - mu[labels]).precision_
    q = rng.standard_normal((10, 16)) * 3
    ref = np.max([-np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in mu], axis=0)
    pred, conf = pp.postprocess(clf, torch.from_numpy(q))
    np.testing.assert_allclose(conf.numpy(), ref, rtol=1e-5)
    assert torch.equal(pred, clf.head(torch.from_numpy(q)).argmax(1))


def test_mahalanobis_separates_points_far_from_every_class():
    rng = np.random.default_rng(2)
    means = 4 * rng.standard_normal((4, 16))
    x, y = gaussian_classes(50, means, 1.0, rng)
    x_id, _ = gaussian_classes(20, means, 1.0, rng)
    x_ood = torch.from_numpy(means.mean(0) + 12 * rng.standard_normal((80, 16)))
    clf = linear_classifier()
    pp = make_postprocessor("mds")
    pp.setup(clf, {"train": [{"data": x, "label": y}]})
    assert check_metrics_against_sklearn(pp.postprocess(clf, x_id)[1], pp.postprocess(clf, x_ood)[1]) > 0.99


def test_mahalanobis_needs_labels():
    pp = MahalanobisPostprocessor()
    with pytest.raises(ValueError, match="labelled"):
        pp.setup(linear_classifier(), {"train": [{"data": torch.randn(4, 16, dtype=torch.float64)}]})
    with pytest.raises(RuntimeError, match="setup"):
        pp.postprocess(linear_classifier(), torch.randn(2, 16, dtype=torch.float64))


# --- KNN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 5, 50])
def test_knn_is_the_squared_kth_neighbour_distance_of_normalized_features(K):
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((120, 16))
    q = rng.standard_normal((15, 16))
    clf = linear_classifier()
    pp = KNNPostprocessor(K)
    pp.setup(clf, {"train": [(torch.from_numpy(bank[:70]), None), (torch.from_numpy(bank[70:]), None)]})
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    dist, _ = NearestNeighbors(n_neighbors=K).fit(unit(bank)).kneighbors(unit(q))
    pred, conf = pp.postprocess(clf, torch.from_numpy(q))
    np.testing.assert_allclose(conf.numpy(), -dist[:, -1] ** 2, atol=2e-6)
    assert torch.equal(pred, clf.head(torch.from_numpy(q)).argmax(1))


def test_knn_separates_directions_outside_the_id_cone():
    rng = np.random.default_rng(4)
    axis = np.eye(16)[0]
    cone = lambda n: 5 * axis + 0.8 * rng.standard_normal((n, 16))  # noqa: E731
    ood = rng.standard_normal((64, 16))
    ood[:, 0] = -np.abs(ood[:, 0])  # pointing away from the ID cone
    clf = linear_classifier()
    pp = KNNPostprocessor(K=10)
    pp.setup(clf, {"val": [(torch.from_numpy(cone(200)), None)]})
    id_conf = pp.postprocess(clf, torch.from_numpy(cone(64)))[1]
    assert check_metrics_against_sklearn(id_conf, pp.postprocess(clf, torch.from_numpy(ood))[1]) > 0.99
    pp.set_hyperparam([500])  # more neighbours than ID features
    with pytest.raises(ValueError, match="K"):
        pp.postprocess(clf, torch.from_numpy(cone(2)))


# --- ViM ------------------------------------------------------------------------------------------


def vim_numpy(w, b, train, test, dim):
    """OpenOOD's ViM recipe, step by step in numpy/scipy/sklearn."""
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(train - u).covariance_
    eig_vals, eig_vecs = np.linalg.eig(cov)
    ns = np.ascontiguousarray(eig_vecs.T[np.argsort(eig_vals * -1)[dim:]].T).real
    alpha = (train @ w.T + b).max(-1).mean() / np.linalg.norm((train - u) @ ns, axis=-1).mean()
    logits = test @ w.T + b
    return logsumexp(logits, axis=-1) - alpha * np.linalg.norm((test - u) @ ns, axis=-1)


@pytest.mark.parametrize("dim", [2, 8, 12])
def test_vim_matches_openood_numpy_recipe(dim):
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((16, 16))
    train = (rng.standard_normal((200, 16)) * np.linspace(4, 0.2, 16)) @ basis  # distinct eigenvalues
    test = rng.standard_normal((12, 16)) @ basis
    clf = linear_classifier()
    pp = ViMPostprocessor(dim)
    pp.setup(clf, {"train": [(torch.from_numpy(train), None)]})
    pred, conf = pp.postprocess(clf, torch.from_numpy(test))
    np.testing.assert_allclose(conf.numpy(), vim_numpy(*head_np(clf), train, test, dim), rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, clf.head(torch.from_numpy(test)).argmax(1))
    pp.set_hyperparam([4])  # the residual space follows the new dim without a new setup
    np.testing.assert_allclose(pp.postprocess(clf, torch.from_numpy(test))[1].numpy(),
                               vim_numpy(*head_np(clf), train, test, 4), rtol=1e-5, atol=1e-5)


def test_vim_separates_features_off_the_id_principal_subspace():
    rng = np.random.default_rng(6)
    d, k = 16, 4
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    inside = lambda n: (5 * rng.standard_normal((n, k))) @ basis[:, :k].T + 0.05 * rng.standard_normal((n, d))  # noqa: E731
    clf = linear_classifier(d)
    with torch.no_grad():  # origin at 0 (−W⁺b = 0) keeps the geometry plain
        clf.head.bias.zero_()
    pp = ViMPostprocessor(dim=k)
    pp.setup(clf, {"train": [(torch.from_numpy(inside(300)), None)]})
    ood = inside(64) + 3 * rng.standard_normal((64, d - k)) @ basis[:, k:].T  # same span + a residual
    id_conf = pp.postprocess(clf, torch.from_numpy(inside(64)))[1]
    assert check_metrics_against_sklearn(id_conf, pp.postprocess(clf, torch.from_numpy(ood))[1]) > 0.99
    pp.set_hyperparam([d])
    with pytest.raises(ValueError, match="dim"):
        pp.postprocess(clf, torch.from_numpy(ood))


# --- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ODINPostprocessor(temperature=0), "temperature"),
        (lambda: ODINPostprocessor(noise=-1), "noise"),
        (lambda: ODINPostprocessor(input_std=[0.5, 0]), "input_std"),
        (lambda: KNNPostprocessor(K=0), "K"),
        (lambda: KNNPostprocessor(K=2.5), "K"),
        (lambda: ViMPostprocessor(dim=0), "dim"),
        (lambda: GENPostprocessor(gamma=0), "gamma"),
        (lambda: GENPostprocessor(M=0), "M"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_methods_are_made_by_name_with_openood_defaults():
    assert make_postprocessor("odin").get_hyperparam() == [1000.0, 0.0014]
    assert make_postprocessor("knn").get_hyperparam() == [50]
    assert make_postprocessor("vim").get_hyperparam() == [256]
    assert make_postprocessor("gen").get_hyperparam() == [0.1, 100]
    assert make_postprocessor("mds").get_hyperparam() == []
    assert list(make_postprocessor("gen").args_dict) == ["gamma_list", "M_list"]
