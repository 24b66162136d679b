"""scaled_logits vs shaping the features; AdaSCALE's perturbation, statistics, ECDF and percentile."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actshift
from actshift.ood import (
    AdaScale,
    EmpiricalCDF,
    FeatureClassifier,
    adaptive_percentile,
    perturb_input,
    scaled_logits,
    shift_statistic,
)

D, C = 96, 7


def relu_features(n=16, d=D):
    return torch.rand(n, d) * (torch.rand(n, d) > 0.3)  # non-negative, a third exact zeros


def head(d=D, c=C):
    return torch.randn(c, d) / d**0.5, torch.randn(c)


def k_of(d, p):
    return d - torch.round(d * torch.as_tensor(p, dtype=torch.float64) / 100).long()


def direct_ratio(z, p):
    """r = Σz / Σ top-k z with torch.topk, k = d − round(d·p/100) per row."""
    k = k_of(z.shape[1], p).expand(z.shape[0])
    top = torch.sort(z, dim=1, descending=True).values
    kept = torch.arange(z.shape[1])[None, :] < k[:, None]
    return z.sum(1) / (top * kept).sum(1)


@pytest.mark.parametrize("percentile", [65, 85, 90.5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_equals_head_of_shaped_features(percentile, with_bias):
    z = relu_features()
    w, b = head()
    b = b if with_bias else None
    expected = F.linear(actshift.percentile_scale(z, percentile, "scale"), w, b)
    torch.testing.assert_close(scaled_logits(z, w, b, percentile, "scale"), expected, rtol=1e-5, atol=1e-5)


def test_scale_accepts_pooled_4d_features_and_per_row_percentiles():
    z = relu_features()
    w, b = head()
    p = torch.linspace(60, 95, z.shape[0])
    expected = F.linear(z * torch.exp(direct_ratio(z, p))[:, None], w, b)
    got = scaled_logits(z[:, :, None, None], w, b, p, "scale")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adascale_variants_take_r_from_relu_features():
    z = torch.randn(12, D) + 0.5  # signed features (a ViT's CLS token): ReLU only inside r
    w, b = head()
    p = torch.linspace(60, 85, 12)
    r = direct_ratio(z.clamp(min=0), p)
    expected_a = F.linear(z * torch.exp(r)[:, None], w, b)
    expected_l = F.linear(z, w, b) * (r * r)[:, None]
    torch.testing.assert_close(scaled_logits(z, w, b, p, "adascale_a"), expected_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled_logits(z, w, b, p, "adascale_l"), expected_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled_logits(z, w, None, p, "adascale_l"), F.linear(z, w) * (r * r)[:, None])


def test_fp16_features_give_fp32_logits():
    z = relu_features()
    w, b = head()
    got = scaled_logits(z.half(), w.half(), b.half(), 85)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, scaled_logits(z, w, b, 85), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(weight=torch.randn(C, D + 1)), "weight"),
        (dict(weight=torch.randn(D)), "weight"),
        (dict(weight=torch.randn(C, D).double()), "weight"),
        (dict(bias=torch.randn(C + 1)), "bias"),
        (dict(variant="ash"), "variant"),
        (dict(percentile=100), "percentile"),
    ],
)
def test_scaled_logits_bad_inputs_name_the_argument(args, match):
    w, b = head()
    kwargs = dict(z=relu_features(), weight=w, bias=b, percentile=85, variant="scale") | args
    with pytest.raises(ValueError, match=match):
        scaled_logits(**kwargs)


def test_empirical_cdf_is_right_continuous():
    cdf = EmpiricalCDF(torch.tensor([3.0, 1.0, 2.0, 2.0]))
    q = torch.tensor([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 10.0])
    assert cdf(q).tolist() == [0.0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0]


def test_adaptive_percentile_formula():
    f = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert adaptive_percentile(f, 60, 85).tolist() == [85.0, 78.75, 72.5, 60.0]
    assert adaptive_percentile(f, 70, 70).tolist() == [70.0] * 4  # p_min = p_max: plain SCALE


@pytest.mark.parametrize("p_min, p_max, match", [(85, 60, "p_min"), (0, 85, "p_min"), (60, 100, "p_max")])
def test_adaptive_percentile_bad_range(p_min, p_max, match):
    with pytest.raises(ValueError, match=match):
        adaptive_percentile(torch.tensor([0.5]), p_min, p_max)


def test_adascale_percentile_from_fitted_cdf():
    ada = AdaScale(60, 85)
    ada.cdf = EmpiricalCDF(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    # F = 0, 0.25, 0.5, 1 → p = 85, 78.75, 72.5, 60: a larger shift gets a smaller percentile.
    assert ada.percentile(torch.tensor([5.0, 10.0, 25.0, 99.0])).tolist() == [85.0, 78.75, 72.5, 60.0]


def conv_classifier(c_in=3, d=40, classes=5):
    features = torch.nn.Sequential(
        torch.nn.Conv2d(c_in, d, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    return FeatureClassifier(features, torch.nn.Linear(d, classes))


@pytest.mark.parametrize(
    "shape, fraction", [((6, 3, 4, 5), 0.05), ((4, 3, 8, 8), 0.05), ((5, 3, 5, 4), 0.25)]
)
def test_perturbation_moves_the_least_attributed_elements_by_epsilon(shape, fraction):
    clf = conv_classifier(shape[1])
    x = torch.randn(shape)
    epsilon = 0.5
    with torch.no_grad():  # as inside a postprocessor: perturb_input enables grad itself
        z, x_tilde = perturb_input(clf, x, fraction, epsilon)
    per_sample = int(np.prod(shape[1:]))
    count = int(per_sample * fraction)
    for i in range(shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(clf(xi).max(), xi)
        grad = grad.flatten()
        delta = (x_tilde[i] - x[i]).flatten()
        moved = torch.nonzero(delta).flatten()
        assert moved.numel() == count
        assert set(moved.tolist()) == set(torch.argsort(grad.abs())[:count].tolist())
        torch.testing.assert_close(delta[moved], epsilon * torch.sign(grad[moved]))
        assert grad.abs()[moved].max() <= grad.abs()[delta == 0].min()
    torch.testing.assert_close(z, clf.features(x).detach())
    assert all(p.grad is None for p in clf.head.parameters())  # no side effect on the model


@pytest.mark.parametrize(
    "fraction, epsilon, match", [(0.001, 0.5, "fraction"), (1.5, 0.5, "fraction"), (0.05, 0.0, "epsilon")]
)
def test_perturbation_bad_arguments(fraction, epsilon, match):
    with pytest.raises(ValueError, match=match):
        perturb_input(conv_classifier(), torch.randn(2, 3, 4, 4), fraction, epsilon)


@pytest.mark.parametrize("d", [256, 50, 7])
def test_shift_statistic_equals_direct_topk_sums(d):
    z = torch.randn(10, d).exp()  # tie-free, so torch.topk positions are unambiguous
    z_tilde = z + 0.3 * torch.randn(10, d)
    k1, k2 = max(1, int(d * 0.01)), max(1, int(d * 0.05))
    top1 = torch.topk(z, k1, dim=1).indices
    top2 = torch.topk(z, k2, dim=1).indices
    q = (z - z_tilde).abs().gather(1, top1).sum(1)
    c_o = z_tilde.clamp(min=0).gather(1, top2).sum(1)
    torch.testing.assert_close(shift_statistic(z, z_tilde, lam=10), c_o + 10 * q)
    torch.testing.assert_close(shift_statistic(z, z_tilde, lam=0), c_o)


def test_adascale_logits_match_a_direct_implementation():
    """The whole recipe against a step-by-step torch re-implementation (topk, counting ECDF)."""
    torch.manual_seed(1)
    clf = conv_classifier(d=120)
    x_id, x_test = torch.randn(32, 3, 6, 6), torch.randn(9, 3, 6, 6) * 1.5

    def shift(x):
        z, x_tilde = perturb_input(clf, x)
        with torch.no_grad():
            z_tilde = clf.features(x_tilde)
        top1, top5 = torch.topk(z, 1, dim=1).indices, torch.topk(z, 6, dim=1).indices  # 1 % and 5 % of 120
        q = (z - z_tilde).abs().gather(1, top1).sum(1)
        return z, z_tilde.clamp(min=0).gather(1, top5).sum(1) + 10 * q

    q_id = shift(x_id)[1]
    z, q_test = shift(x_test)
    cdf = (q_id[None, :] <= q_test[:, None]).double().mean(1)
    p = 60 + (1 - cdf) * 25
    r = direct_ratio(z.clamp(min=0), p)
    w, b = clf.head.weight.detach(), clf.head.bias.detach()
    for variant, expected in (
        ("a", F.linear(z * torch.exp(r)[:, None], w, b)),
        ("l", F.linear(z, w, b) * (r * r)[:, None]),
    ):
        ada = AdaScale(variant=variant).fit(clf, x_id.split(10))
        torch.testing.assert_close(ada.logits(clf, x_test), expected, rtol=1e-5, atol=1e-5)


def test_adascale_needs_fit_and_a_known_variant():
    with pytest.raises(RuntimeError, match="fit"):
        AdaScale().logits(conv_classifier(), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="variant"):
        AdaScale(variant="x")
    with pytest.raises(ValueError, match="inputs"):
        AdaScale().fit(conv_classifier(), [])
