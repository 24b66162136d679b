"""Post-hoc OOD detection on top of actshift's shaping kernels.

    from actshift import ood
    pp = ood.ScalePostprocessor(percentile=85)       # or ood.make_postprocessor("scale")
    pp.setup(model, {"val": id_val_loader}, {})
    pred, conf = pp.postprocess(model, images)       # conf: higher = more in-distribution
    ood.ood_metrics(id_conf, ood_conf)               # AUROC, AUPR_IN, AUPR_OUT, FPR@95 (both conventions)

Modules: metrics (AUROC/AUPR/FPR@TPR), heads (SCALE/AdaSCALE logits without shaped features),
adascale (the full AdaSCALE recipe), adapters (features + linear head of HF ResNet/ViT, HF text
classifiers, OpenOOD nets, any feature function), postprocessors (OpenOOD-shaped MSP, energy,
ReAct, ASH, SCALE, AdaSCALE), posthoc (ODIN, Mahalanobis, KNN, ViM, GEN), digits (an offline
evaluation on scikit-learn's digits; `actshift ood-eval`).
"""

from .adapters import (
    Classifier,
    FeatureClassifier,
    HFResNetClassifier,
    HFTextClassifier,
    HFViTClassifier,
    OpenOODClassifier,
    as_classifier,
)
from .adascale import AdaScale, EmpiricalCDF, adaptive_percentile, perturb_input, shift_statistic
from .heads import scaled_logits
from .metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics
from .postprocessors import (
    METHODS,
    AdaScalePostprocessor,
    ASHPostprocessor,
    EnergyPostprocessor,
    MSPPostprocessor,
    Postprocessor,
    ReActPostprocessor,
    ScalePostprocessor,
    make_postprocessor,
)
from .posthoc import (
    GENPostprocessor,
    KNNPostprocessor,
    MahalanobisPostprocessor,
    ODINPostprocessor,
    ViMPostprocessor,
)

__all__ = [
    "Classifier",
    "FeatureClassifier",
    "HFResNetClassifier",
    "HFViTClassifier",
    "HFTextClassifier",
    "OpenOODClassifier",
    "as_classifier",
    "AdaScale",
    "EmpiricalCDF",
    "adaptive_percentile",
    "perturb_input",
    "shift_statistic",
    "scaled_logits",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "ood_metrics",
    "METHODS",
    "Postprocessor",
    "MSPPostprocessor",
    "EnergyPostprocessor",
    "ReActPostprocessor",
    "ASHPostprocessor",
    "ScalePostprocessor",
    "AdaScalePostprocessor",
    "make_postprocessor",
    "ODINPostprocessor",
    "MahalanobisPostprocessor",
    "KNNPostprocessor",
    "ViMPostprocessor",
    "GENPostprocessor",
]
