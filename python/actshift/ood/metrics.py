"""OOD-detection metrics on confidence scores (higher = more in-distribution), in numpy.

Every metric is a function of two score sets, `id_conf` (N_in) and `ood_conf` (N_out), through one
binary ROC/PR curve: pick which set is "positive" and a score that ranks positives high, sort by
score, and put one curve point at each *distinct* score value t (samples tied at t enter together,
exactly as sklearn's `roc_curve(drop_intermediate=False)` and `precision_recall_curve` do):

    TP(t) = #{positives with score ≥ t},  FP(t) = #{negatives with score ≥ t}
    TPR = TP/P,  FPR = FP/N,  precision = TP/(TP + FP),  recall = TPR

- AUROC: trapezoidal area under (FPR, TPR), starting at (0, 0). It is the same whichever set is
  positive: P(conf_ID > conf_OOD) + ½·P(conf_ID = conf_OOD).
- AUPR_IN: area under the PR curve with ID positive and score conf; AUPR_OUT: OOD positive and
  score −conf. Each is the trapezoidal area over the curve points and the point
  (recall 0, precision 1), i.e. OpenOOD's `auc(recall, precision)` over sklearn's
  `precision_recall_curve` (not sklearn's step-wise average precision).
- FPR@TPR (default 95 %), the smallest FPR over thresholds whose TPR is at least `tpr`, i.e. FPR at
  the first curve point with TPR ≥ tpr. Two conventions, which give different numbers:
    * "ood_positive" (OpenOOD v1.5): positives = OOD, score −conf. The fraction of ID samples
      flagged as OOD when 95 % of OOD samples are caught.
    * "id_positive" (ReAct, ASH and most papers before OpenOOD v1.5): positives = ID, score conf.
      The fraction of OOD samples accepted when 95 % of ID samples are accepted.
  OpenOOD calls sklearn's `roc_curve` with its default `drop_intermediate=True`, which drops
  collinear curve points; on exactly tied score groups that can skip the first point reaching the
  TPR and report a larger FPR. We keep every threshold; on tie-free scores both agree.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]
CONVENTIONS = ("ood_positive", "id_positive")


def _scores(values, name: str) -> np.ndarray:
    """A 1-D, non-empty, finite float64 copy of `values` (numpy array, torch tensor or sequence)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf scores")
    return array


def _curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TP, FP) counts at each distinct score, from the highest score down (sklearn's binary curve)."""
    scores = np.concatenate([positive, negative])
    is_positive = np.concatenate([np.ones(positive.size, np.int64), np.zeros(negative.size, np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    # The last index of each group of equal scores: a tie group is one threshold.
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(is_positive)[ends]
    fp = ends + 1 - tp
    return tp, fp


def _roc(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp, fp = _curve(positive, negative)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _aupr(positive: np.ndarray, negative: np.ndarray) -> float:
    tp, fp = _curve(positive, negative)
    # Recall rises as the threshold falls; the curve starts at (recall 0, precision 1).
    precision = np.r_[1.0, tp / (tp + fp)]
    recall = np.r_[0.0, tp / tp[-1]]
    return float(np.trapezoid(precision, recall))


def auroc(id_conf: ArrayLike, ood_conf: ArrayLike) -> float:
    """Area under the ROC curve: P(conf_ID > conf_OOD) + ½·P(tie); 1 = perfect, 0.5 = chance."""
    fpr, tpr = _roc(_scores(id_conf, "id_conf"), _scores(ood_conf, "ood_conf"))
    return float(np.trapezoid(tpr, fpr))


def aupr_in(id_conf: ArrayLike, ood_conf: ArrayLike) -> float:
    """Area under the precision-recall curve with ID as positive, ranked by conf."""
    return _aupr(_scores(id_conf, "id_conf"), _scores(ood_conf, "ood_conf"))


def aupr_out(id_conf: ArrayLike, ood_conf: ArrayLike) -> float:
    """Area under the precision-recall curve with OOD as positive, ranked by −conf."""
    return _aupr(-_scores(ood_conf, "ood_conf"), -_scores(id_conf, "id_conf"))


def fpr_at_tpr(
    id_conf: ArrayLike, ood_conf: ArrayLike, tpr: float = 0.95, convention: str = "ood_positive"
) -> float:
    """The smallest false-positive rate at a true-positive rate ≥ `tpr` (see the module docstring).

    convention "ood_positive" (OpenOOD v1.5): FPR = #{ID with conf ≤ t}/N_in at the smallest t with
    #{OOD with conf ≤ t}/N_out ≥ tpr. "id_positive" (ReAct/ASH): FPR = #{OOD with conf ≥ t}/N_out
    at the largest t with #{ID with conf ≥ t}/N_in ≥ tpr.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if isinstance(tpr, bool) or not isinstance(tpr, numbers.Real) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    id_scores, ood_scores = _scores(id_conf, "id_conf"), _scores(ood_conf, "ood_conf")
    if convention == "ood_positive":
        fprs, tprs = _roc(-ood_scores, -id_scores)
    else:
        fprs, tprs = _roc(id_scores, ood_scores)
    # TPR and FPR both grow as the threshold falls, so the first point reaching tpr has the least FPR.
    return float(fprs[np.argmax(tprs >= tpr)])


def ood_metrics(id_conf: ArrayLike, ood_conf: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR_IN, AUPR_OUT, FPR@95 (OOD positive, OpenOOD v1.5) and FPR@95_id_positive
    (ReAct/ASH), each in [0, 1]."""
    return {
        "AUROC": auroc(id_conf, ood_conf),
        "AUPR_IN": aupr_in(id_conf, ood_conf),
        "AUPR_OUT": aupr_out(id_conf, ood_conf),
        "FPR@95": fpr_at_tpr(id_conf, ood_conf, 0.95, "ood_positive"),
        "FPR@95_id_positive": fpr_at_tpr(id_conf, ood_conf, 0.95, "id_positive"),
    }
