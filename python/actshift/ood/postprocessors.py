"""OpenOOD-shaped postprocessors: MSP, energy, ReAct, ASH-P/B/S, SCALE and AdaSCALE-A/L (ODIN,
Mahalanobis, KNN, ViM and GEN are in posthoc.py).

Each follows OpenOOD v1.5's `BasePostprocessor` contract (and subclasses it when openood is
importable, so `openood.evaluation_api.Evaluator(postprocessor=...)` accepts it):

    pp = ScalePostprocessor(percentile=85)
    pp.setup(net, id_loader_dict, ood_loader_dict)   # ID statistics, from id_loader_dict["val"] or ["train"]
    pred, conf = pp.postprocess(net, x)              # conf: higher = more in-distribution
    pp.args_dict                                     # {"percentile_list": [...]}: the APS sweep
    pp.set_hyperparam([90]); pp.get_hyperparam()     # one value per sweep key, in key order

`net` is anything `as_classifier` accepts (FeatureClassifier, transformers ResNet/ViT image
classifiers, OpenOOD nets); the postprocessors call the features and the head themselves, so no
OpenOOD wrapper network (ASHNet, ScaleNet, ...) is needed. Loaders yield OpenOOD dicts
({"data": x, "label": y}) or (x, y) tuples.

With z the penultimate features and (W, b) the head, the logits and scores are

    MSP        conf = max softmax(W z + b)
    energy     conf = T·logsumexp((W z + b)/T)
    ReAct      W min(z, c) + b;  c = the p-th percentile (default 90) of all ID activations, pooled
               over samples and features (numpy's linear interpolation)
    ASH-P/B/S  W ash(z, p) + b  (p = 60 / 65 / 90 by default)
    SCALE      e^r·(W z) + b,  r = Σz / Σ top-k z  (p = 85)
    AdaSCALE   per-sample p in [p_min, p_max] = [60, 85] from ID statistics (see adascale.py)

and, except for MSP and energy, conf = logsumexp(logits) (T = 1); pred = argmax of the logits
actually scored (the shaped ones), as in OpenOOD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..ops import energy, percentile_scale
from ..ops.percentile import refuse_fraction
from ._checks import check_number
from .adapters import Classifier, as_classifier, head_device, head_features, to_device
from .adascale import AdaScale
from .heads import scaled_logits

try:  # OpenOOD is optional: subclass its base when present so its Evaluator accepts ours.
    from openood.postprocessors import BasePostprocessor
except ImportError:
    BasePostprocessor = object

_PERCENTILE_SWEEP = [65, 70, 75, 80, 85, 90, 95]  # OpenOOD's ash.yml / scale.yml


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) of an OpenOOD dict batch, an (x, y) / (x,) tuple batch, or a
    tokenizer's output (a dict with input_ids or inputs_embeds; labels under "label(s)")."""
    if isinstance(batch, Mapping):
        if "data" in batch:
            return batch["data"], batch.get("label")
        if "input_ids" in batch or "inputs_embeds" in batch:
            labels = batch.get("labels", batch.get("label"))
            return {k: v for k, v in batch.items() if k not in ("label", "labels")}, labels
        raise ValueError(f"a dict batch must hold the inputs under 'data' (or be a tokenizer's output), "
                         f"got keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch must be a dict with 'data' or an (x, y) tuple, got {type(batch).__name__}")


def id_inputs(id_loader_dict: Mapping[str, Iterable], device: torch.device) -> Iterable[torch.Tensor]:
    """The input batches of the ID statistics loader: id_loader_dict["val"], else ["train"]."""
    if not isinstance(id_loader_dict, Mapping):
        raise TypeError(f"id_loader_dict must be a dict of loaders, got {type(id_loader_dict).__name__}")
    key = "val" if "val" in id_loader_dict else "train"
    if key not in id_loader_dict:
        raise ValueError(
            f"id_loader_dict must hold a 'val' or 'train' loader, got keys {sorted(id_loader_dict)}"
        )
    return (to_device(split_batch(batch)[0], device) for batch in id_loader_dict[key])


class Postprocessor(BasePostprocessor):
    """Shared machinery: hyper-parameters and their sweep, postprocess, inference.

    A subclass names its hyper-parameters (`hyperparameters`), gives each a sweep list (`sweep`,
    exposed as OpenOOD's `args_dict` with keys "<name>_list"), validates and stores them in
    `configure`, and computes `logits` (default: the unshaped head) and `score` (default: energy)."""

    hyperparameters: ClassVar[tuple[str, ...]] = ()
    sweep: ClassVar[dict[str, list]] = {}

    def __init__(self, **hyperparameters: Any):
        self.args_dict = {f"{name}_list": list(self.sweep[name]) for name in self.hyperparameters}
        self.APS_mode = False  # OpenOOD's Evaluator runs its hyper-parameter search when True
        self.hyperparam_search_done = False
        self.setup_flag = False
        self.configure(**hyperparameters)

    def configure(self, **hyperparameters: Any) -> None:
        """Validates and stores the hyper-parameters (every name in `hyperparameters`)."""

    def setup(
        self, net, id_loader_dict: Mapping[str, Iterable], ood_loader_dict: Mapping | None = None
    ) -> None:
        """Computes ID statistics where the method has any (ReAct, AdaSCALE); OOD loaders are unused."""
        self.setup_flag = True

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        return clf.head(head_features(clf, x))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return energy(logits)

    @torch.no_grad()
    def postprocess(self, net, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred, conf) for a batch of inputs: argmax and score of the (shaped) logits."""
        clf = as_classifier(net)
        logits = self.logits(clf, to_device(data, head_device(clf)))
        return logits.argmax(dim=1), self.score(logits)

    def inference(
        self, net, data_loader: Iterable, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pred, conf, label) numpy arrays over a loader of labelled batches (OpenOOD's signature;
        `progress` is accepted for compatibility and draws nothing)."""
        preds, confs, labels = [], [], []
        for batch in data_loader:
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("inference needs labelled batches: {'data', 'label'} dicts or (x, y) tuples")
            pred, conf = self.postprocess(net, x)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            labels.append(torch.as_tensor(y).cpu())
        if not preds:
            raise ValueError("data_loader yielded no batches")
        return torch.cat(preds).numpy(), torch.cat(confs).double().numpy(), torch.cat(labels).numpy()

    def set_hyperparam(self, hyperparam: Sequence) -> None:
        """Sets the hyper-parameters from one value per `args_dict` key, in key order (OpenOOD APS)."""
        if len(hyperparam) != len(self.hyperparameters):
            raise ValueError(
                f"hyperparam must hold {len(self.hyperparameters)} value(s) "
                f"({', '.join(self.hyperparameters) or 'none'}), got {list(hyperparam)!r}"
            )
        self.configure(**dict(zip(self.hyperparameters, hyperparam)))

    def get_hyperparam(self) -> list:
        """The current hyper-parameters, in `args_dict` key order (set_hyperparam's input)."""
        return [getattr(self, name) for name in self.hyperparameters]


class MSPPostprocessor(Postprocessor):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1).max(dim=1).values


class EnergyPostprocessor(Postprocessor):
    """Energy score T·logsumexp(logits/T) (Liu et al., 2020; OpenOOD's "ebo")."""

    hyperparameters = ("temperature",)
    sweep: ClassVar[dict[str, list]] = {"temperature": [1]}

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature=temperature)

    def configure(self, temperature: float) -> None:
        self.temperature = check_number(temperature, "temperature", 0.0, float("inf"), include_high=False)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return energy(logits, self.temperature)


def _percentile(value, allow_small_percentile: bool, name: str = "percentile") -> float:
    refuse_fraction(value, allow_small_percentile, name)
    return check_number(value, name, 0.0, 100.0, include_high=False)


class ReActPostprocessor(Postprocessor):
    """ReAct (Sun et al., 2021): clip features at c, the `percentile`-th percentile of ID activations."""

    hyperparameters = ("percentile",)
    sweep: ClassVar[dict[str, list]] = {"percentile": [85, 90, 95, 99]}

    def __init__(self, percentile: float = 90, *, allow_small_percentile: bool = False):
        self.activations: torch.Tensor | None = None  # every ID activation, sorted (set by setup)
        self.clip: float | None = None
        self.allow_small_percentile = allow_small_percentile
        super().__init__(percentile=percentile)

    def configure(self, percentile: float) -> None:
        self.percentile = _percentile(percentile, self.allow_small_percentile)
        if self.activations is not None:
            self.clip = sorted_percentile(self.activations, self.percentile)

    @torch.no_grad()
    def setup(self, net, id_loader_dict, ood_loader_dict=None) -> None:
        clf = as_classifier(net)
        device = head_device(clf)
        feats = [head_features(clf, x).float().flatten() for x in id_inputs(id_loader_dict, device)]
        if not feats:
            raise ValueError("id_loader_dict: the ID loader yielded no batches")
        # Sorted once, so every percentile of the APS sweep is a lookup; torch.sort has no 2^24
        # element limit (torch.quantile does).
        self.activations = torch.sort(torch.cat(feats).cpu()).values
        self.clip = sorted_percentile(self.activations, self.percentile)
        self.setup_flag = True

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            raise RuntimeError("ReActPostprocessor.setup must run on ID data before postprocess")
        return clf.head(percentile_scale(head_features(clf, x), method="react", clip=self.clip))


def sorted_percentile(values: torch.Tensor, percentile: float) -> float:
    """numpy's default (linear) percentile of sorted 1-D values: the value at fractional index
    (n − 1)·p/100, interpolated between its neighbours."""
    position = (values.numel() - 1) * percentile / 100.0
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    below, above = float(values[low]), float(values[high])
    return below + (above - below) * (position - low)


class ASHPostprocessor(Postprocessor):
    """ASH (Djurisic et al., 2023): variant "p" prunes to the top k, "b" binarizes the kept values to
    Σz/k, "s" prunes and scales by e^r. Default percentiles 60 / 65 / 90 (the paper's ImageNet ones)."""

    hyperparameters = ("percentile",)
    sweep: ClassVar[dict[str, list]] = {"percentile": _PERCENTILE_SWEEP}
    DEFAULT_PERCENTILE: ClassVar[dict[str, float]] = {"p": 60, "b": 65, "s": 90}

    def __init__(self, variant: str = "s", percentile: float | None = None, *, allow_small_percentile: bool = False):
        if variant not in self.DEFAULT_PERCENTILE:
            raise ValueError(f"variant must be one of {', '.join(self.DEFAULT_PERCENTILE)}, got {variant!r}")
        self.variant = variant
        self.allow_small_percentile = allow_small_percentile
        super().__init__(percentile=self.DEFAULT_PERCENTILE[variant] if percentile is None else percentile)

    def configure(self, percentile: float) -> None:
        self.percentile = _percentile(percentile, self.allow_small_percentile)

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        return clf.head(percentile_scale(head_features(clf, x), self.percentile, f"ash_{self.variant}",
                                         allow_small_percentile=self.allow_small_percentile))


class ScalePostprocessor(Postprocessor):
    """SCALE (Xu et al., 2024): logits e^r·(W z) + b, r = Σz / Σ top-k z, via `scaled_logits`."""

    hyperparameters = ("percentile",)
    sweep: ClassVar[dict[str, list]] = {"percentile": _PERCENTILE_SWEEP}

    def __init__(self, percentile: float = 85, *, allow_small_percentile: bool = False):
        self.allow_small_percentile = allow_small_percentile
        super().__init__(percentile=percentile)

    def configure(self, percentile: float) -> None:
        self.percentile = _percentile(percentile, self.allow_small_percentile)

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        return scaled_logits(head_features(clf, x), clf.head.weight, clf.head.bias, self.percentile, "scale",
                             allow_small_percentile=self.allow_small_percentile)


class AdaScalePostprocessor(Postprocessor):
    """AdaSCALE-A (variant "a") or -L ("l"); percentile = [p_min, p_max]; the other keywords go to
    `AdaScale` (lam, fraction, epsilon, k1, k2). setup fits the ECDF of the shift statistic on ID data."""

    hyperparameters = ("percentile",)
    sweep: ClassVar[dict[str, list]] = {"percentile": [[60, p] for p in (65, 70, 75, 80, 85, 90, 95, 99)]}

    def __init__(self, variant: str = "a", percentile: Sequence[float] = (60, 85), *,
                 allow_small_percentile: bool = False, **adascale_options: float):
        self.allow_small_percentile = allow_small_percentile
        self.adascale = AdaScale(*self._range(percentile), variant=variant, **adascale_options)
        super().__init__(percentile=percentile)

    @staticmethod
    def _range(percentile: Sequence[float]) -> tuple[float, float]:
        if (
            isinstance(percentile, (str, bytes))
            or not isinstance(percentile, Sequence)
            or len(percentile) != 2
        ):
            raise ValueError(f"percentile must be a pair [p_min, p_max], got {percentile!r}")
        return percentile[0], percentile[1]

    def configure(self, percentile: Sequence[float]) -> None:
        for name, p in zip(("percentile[0] (p_min)", "percentile[1] (p_max)"), self._range(percentile)):
            refuse_fraction(p, self.allow_small_percentile, name)
        self.adascale.set_range(*self._range(percentile))
        self.percentile = [self.adascale.p_min, self.adascale.p_max]

    def setup(self, net, id_loader_dict, ood_loader_dict=None) -> None:
        clf = as_classifier(net)
        self.adascale.fit(clf, id_inputs(id_loader_dict, head_device(clf)))
        self.setup_flag = True

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        return self.adascale.logits(clf, x)


METHODS = ("msp", "energy", "react", "ash_p", "ash_b", "ash_s", "scale", "adascale_a", "adascale_l",
           "odin", "mds", "knn", "vim", "gen")


def make_postprocessor(method: str, **hyperparameters: Any) -> Postprocessor:
    """A postprocessor by method name, with the method's defaults unless overridden.

    Args:
        method: one of METHODS: "msp", "energy" (keyword temperature), "react" (percentile of the
            ID activations used as the clip, default 90), "ash_p" / "ash_b" / "ash_s" (percentile,
            defaults 60 / 65 / 90), "scale" (percentile, default 85), "adascale_a" / "adascale_l"
            (percentile = [p_min, p_max], default [60, 85], plus AdaScale's lam, fraction, epsilon,
            k1, k2; see `AdaScale`); and the post-hoc baselines of actshift.ood.posthoc: "odin",
            "mds" (Mahalanobis), "knn", "vim", "gen".
        hyperparameters: the method's keywords above. Percentiles are in (0, 100) as in
            numpy.percentile; a percentile below 1 (e.g. 0.85, a torch.quantile-style fraction) is
            refused unless allow_small_percentile=True.

    Returns:
        An OpenOOD-shaped postprocessor: `setup(net, id_loader_dict, ood_loader_dict)` computes ID
        statistics (ReAct's clip, AdaSCALE's CDF; a no-op for the others), `postprocess(net, x)`
        returns (pred, conf) with higher conf = more in-distribution, `inference(net, loader)` runs
        a labelled loader, and `args_dict` / `set_hyperparam` drive OpenOOD's hyper-parameter search.
    """
    from . import posthoc  # it builds on this module

    if method in ("ash_p", "ash_b", "ash_s"):
        return ASHPostprocessor(method[-1], **hyperparameters)
    if method in ("adascale_a", "adascale_l"):
        return AdaScalePostprocessor(method[-1], **hyperparameters)
    classes = {
        "msp": MSPPostprocessor,
        "energy": EnergyPostprocessor,
        "react": ReActPostprocessor,
        "scale": ScalePostprocessor,
        "odin": posthoc.ODINPostprocessor,
        "mds": posthoc.MahalanobisPostprocessor,
        "knn": posthoc.KNNPostprocessor,
        "vim": posthoc.ViMPostprocessor,
        "gen": posthoc.GENPostprocessor,
    }
    if method not in classes:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return classes[method](**hyperparameters)
