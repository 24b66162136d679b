"""OOD metrics vs scikit-learn (OpenOOD's formulas) and vs their definitions, incl. heavy ties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from actshift.ood import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics


def sklearn_metrics(id_conf, ood_conf):
    """OpenOOD v1.5's auc_and_fpr_recall, with every ROC threshold kept (drop_intermediate=False)."""
    conf = np.concatenate([id_conf, ood_conf])
    is_ood = np.r_[np.zeros(len(id_conf)), np.ones(len(ood_conf))]
    fpr, tpr, _ = roc_curve(is_ood, -conf, drop_intermediate=False)
    fpr_id, tpr_id, _ = roc_curve(1 - is_ood, conf, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = precision_recall_curve(is_ood, -conf)
    return {
        "AUROC": roc_auc_score(1 - is_ood, conf),
        "AUPR_IN": auc(r_in, p_in),
        "AUPR_OUT": auc(r_out, p_out),
        "FPR@95": fpr[np.argmax(tpr >= 0.95)],
        "FPR@95_id_positive": fpr_id[np.argmax(tpr_id >= 0.95)],
    }


def score_sets(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 300, size=2)
    if ties:  # a handful of distinct values: most thresholds split tie groups of both sets
        return rng.integers(0, 6, n_id).astype(float), rng.integers(0, 5, n_ood).astype(float)
    return rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tie-heavy"])
@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_sklearn(seed, ties):
    id_conf, ood_conf = score_sets(seed, ties)
    ours, ref = ood_metrics(id_conf, ood_conf), sklearn_metrics(id_conf, ood_conf)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
)
def test_metrics_match_sklearn_on_small_tied_sets(id_conf, ood_conf):
    id_conf, ood_conf = np.array(id_conf, float), np.array(ood_conf, float)
    ours, ref = ood_metrics(id_conf, ood_conf), sklearn_metrics(id_conf, ood_conf)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_tie_free_fpr_equals_openood_expression():
    """On tie-free scores sklearn's default drop_intermediate=True (what OpenOOD calls) changes nothing."""
    id_conf, ood_conf = score_sets(3, ties=False)
    conf = np.concatenate([id_conf, ood_conf])
    is_ood = np.r_[np.zeros(len(id_conf)), np.ones(len(ood_conf))]
    fpr, tpr, _ = roc_curve(is_ood, -conf)
    assert fpr_at_tpr(id_conf, ood_conf) == fpr[np.argmax(tpr >= 0.95)]


def brute_force_fpr(id_conf, ood_conf, tpr, convention):
    """The definition: the least FPR over every threshold t whose TPR is at least `tpr`."""
    best = 1.0
    for t in np.unique(np.concatenate([id_conf, ood_conf, [np.inf, -np.inf]])):
        if convention == "id_positive":  # accept as ID when conf >= t
            true_pos, false_pos = np.mean(id_conf >= t), np.mean(ood_conf >= t)
        else:  # flag as OOD when conf <= t
            true_pos, false_pos = np.mean(ood_conf <= t), np.mean(id_conf <= t)
        if true_pos >= tpr:
            best = min(best, false_pos)
    return best


@pytest.mark.parametrize("convention", ["ood_positive", "id_positive"])
@pytest.mark.parametrize("tpr", [0.95, 0.8, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(6))
def test_fpr_conventions_match_definition(seed, tpr, convention):
    id_conf, ood_conf = score_sets(seed, ties=seed % 2 == 1)
    assert fpr_at_tpr(id_conf, ood_conf, tpr, convention) == pytest.approx(
        brute_force_fpr(id_conf, ood_conf, tpr, convention), abs=1e-12
    )


def test_id_positive_equals_react_code_when_5_percent_is_whole():
    """ReAct/ASH's util/metrics.py: threshold = sorted(ID)[round(0.05·N)], FPR = mean(OOD > threshold);
    identical to ours on tie-free scores when 0.05·N is an integer."""
    rng = np.random.default_rng(7)
    id_conf, ood_conf = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    threshold = np.sort(id_conf)[round(0.05 * id_conf.size)]
    assert fpr_at_tpr(id_conf, ood_conf, convention="id_positive") == np.mean(ood_conf > threshold)


def test_conventions_differ():
    """The same scores give different FPR@95 under the two conventions (why both are reported)."""
    rng = np.random.default_rng(1)
    id_conf, ood_conf = rng.normal(0, 1, 500), rng.normal(-1, 2, 500)
    m = ood_metrics(id_conf, ood_conf)
    assert abs(m["FPR@95"] - m["FPR@95_id_positive"]) > 0.1


def test_perfect_and_inverted_separation():
    id_conf, ood_conf = np.arange(10, 20.0), np.arange(0, 10.0)
    perfect = ood_metrics(id_conf, ood_conf)
    assert perfect == {
        "AUROC": 1.0,
        "AUPR_IN": 1.0,
        "AUPR_OUT": 1.0,
        "FPR@95": 0.0,
        "FPR@95_id_positive": 0.0,
    }
    inverted = ood_metrics(ood_conf, id_conf)
    assert inverted["AUROC"] == 0.0
    assert inverted["FPR@95"] == 1.0 and inverted["FPR@95_id_positive"] == 1.0
    assert inverted["AUPR_IN"] < 0.5 and inverted["AUPR_OUT"] < 0.5
    same = ood_metrics(np.ones(5), np.ones(7))  # one tie group: chance level
    assert same["AUROC"] == 0.5 and same["FPR@95"] == 1.0 and same["FPR@95_id_positive"] == 1.0


def test_accepts_tensors_and_lists():
    id_conf, ood_conf = torch.tensor([3.0, 2.0, 0.5]), [1.0, 0.0]
    assert auroc(id_conf, ood_conf) == pytest.approx(5 / 6)
    assert aupr_in(id_conf, ood_conf) == aupr_in(id_conf.numpy(), np.array(ood_conf))
    assert aupr_out(id_conf.double(), ood_conf) == aupr_out(id_conf.tolist(), ood_conf)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: auroc([1.0, np.nan], [0.0]), "id_conf"),
        (lambda: aupr_in([1.0], [np.inf]), "ood_conf"),
        (lambda: aupr_out([], [0.0]), "id_conf"),
        (lambda: auroc(np.ones((2, 2)), [0.0]), "id_conf"),
        (lambda: fpr_at_tpr([1.0], [0.0], tpr=0.0), "tpr"),
        (lambda: fpr_at_tpr([1.0], [0.0], tpr=1.5), "tpr"),
        (lambda: fpr_at_tpr([1.0], [0.0], convention="ood"), "convention"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
