"""The common post-hoc OOD baselines beside activation shaping, as OpenOOD v1.5 computes them:
ODIN, Mahalanobis (OpenOOD's "mds"), KNN, ViM and GEN, in the same postprocessor shape as
postprocessors.py (setup on ID data, postprocess -> (pred, conf), args_dict sweeps from OpenOOD's
configs). With z the penultimate features, (W, b) the head and logits l = W z + b:

    ODIN   x̃ = x − ε·sign(∇x CE(l(x)/T, argmax l(x))) (÷ per-channel input std if given; a zero
           gradient counts as +), conf = max softmax(l(x̃)/T)              T = 1000, ε = 0.0014
    MDS    class means μ_c and one tied covariance Σ (maximum likelihood, over class-centered ID
           train features), conf = max_c −(z − μ_c)ᵀ Σ⁺ (z − μ_c)
    KNN    ẑ = z/‖z‖; conf = −‖ẑ − ẑ_(k)‖², ẑ_(k) the k-th nearest normalized ID train feature
           (squared, as faiss' IndexFlatL2 returns it)                      k = 50
    ViM    o = −W⁺b; P⊥ = the eigenvectors of the ID covariance of z − o beyond the top `dim`;
           virtual logit v = α‖(z − o) P⊥‖ with α = mean max-logit / mean ‖(z − o) P⊥‖ over ID
           train; conf = logsumexp(l) − v
    GEN    p = softmax(l), conf = −Σ over the M largest p of p^γ (1 − p)^γ   γ = 0.1, M = 100

pred = argmax l (ODIN: of the perturbed input). MDS, KNN and ViM fit on id_loader_dict["train"]
(else "val"), as OpenOOD does; MDS needs labelled batches. ODIN perturbs the input, so it needs a
continuous one: images, or a text classifier's token embeddings (done for you).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch

from ._checks import check_number
from .adapters import Classifier, as_classifier, head_device, head_features, to_device
from .adascale import continuous_input
from .postprocessors import Postprocessor, split_batch


def id_batches(id_loader_dict: Mapping[str, Iterable], device: torch.device):
    """(inputs, labels or None) batches of id_loader_dict["train"], else ["val"]."""
    if not isinstance(id_loader_dict, Mapping):
        raise TypeError(f"id_loader_dict must be a dict of loaders, got {type(id_loader_dict).__name__}")
    key = "train" if "train" in id_loader_dict else "val"
    if key not in id_loader_dict:
        raise ValueError(
            f"id_loader_dict must hold a 'train' or 'val' loader, got keys {sorted(id_loader_dict)}"
        )
    for batch in id_loader_dict[key]:
        x, y = split_batch(batch)
        yield to_device(x, device), (None if y is None else torch.as_tensor(y).long().cpu())


@torch.no_grad()
def id_features(
    clf: Classifier, id_loader_dict, *, labels: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp64 CPU features [N, D] of the ID fitting loader and, with labels=True, their labels [N]
    (ValueError for unlabelled batches)."""
    feats, ys = [], []
    for x, y in id_batches(id_loader_dict, head_device(clf)):
        feats.append(head_features(clf, x).double().cpu())
        if labels and y is None:
            raise ValueError(
                "id_loader_dict: this method needs labelled ID batches ({'data', 'label'} or (x, y))"
            )
        ys.append(y)
    if not feats:
        raise ValueError("id_loader_dict: the ID loader yielded no batches")
    return torch.cat(feats), (torch.cat(ys) if labels else None)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _FeaturePostprocessor(Postprocessor):
    """Scores computed from the features themselves (after a setup on ID data)."""

    def feature_score(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def postprocess(self, net, data) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.setup_flag:
            raise RuntimeError(f"{type(self).__name__}.setup must run on ID data before postprocess")
        clf = as_classifier(net)
        z = head_features(clf, to_device(data, head_device(clf)))
        return clf.head(z).argmax(dim=1), self.feature_score(z)


class ODINPostprocessor(Postprocessor):
    """ODIN (Liang et al., 2018): temperature scaling plus an input step against the predicted
    class. `input_std`: per-channel std of the input normalization (dim 1), by which OpenOOD divides
    the gradient sign; None = no division."""

    hyperparameters = ("temperature", "noise")
    sweep: ClassVar[dict[str, list]] = {"temperature": [1, 10, 100, 1000], "noise": [0.0014, 0.0028]}

    def __init__(
        self, temperature: float = 1000.0, noise: float = 0.0014, input_std: Sequence[float] | None = None
    ):
        if input_std is not None:
            std = torch.as_tensor(input_std, dtype=torch.float32)
            if std.dim() != 1 or std.numel() == 0 or not bool((std > 0).all()):
                raise ValueError(f"input_std must be positive per-channel values, got {input_std!r}")
            input_std = std
        self.input_std = input_std
        super().__init__(temperature=temperature, noise=noise)

    def configure(self, temperature: float, noise: float) -> None:
        self.temperature = check_number(temperature, "temperature", 0.0, math.inf, include_high=False)
        self.noise = check_number(noise, "noise", 0.0, math.inf, include_low=True, include_high=False)

    def perturb(self, clf: Classifier, x) -> object:
        """The perturbed model inputs x̃."""
        x, valid, rebuild = continuous_input(clf, x)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = clf.head(head_features(clf, rebuild(x)))
            loss = torch.nn.functional.cross_entropy(logits / self.temperature, logits.argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, x)
        step = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
        if self.input_std is not None:
            if x.dim() < 2 or x.shape[1] != self.input_std.numel():
                raise ValueError(
                    f"input_std has {self.input_std.numel()} channels, the inputs {tuple(x.shape)}"
                )
            step = step / self.input_std.to(x.device).view(1, -1, *([1] * (x.dim() - 2)))
        if valid is not None:  # padding is not input
            step = step * valid.view_as(step)
        return rebuild(x.detach() - self.noise * step)

    @torch.no_grad()
    def postprocess(self, net, data) -> tuple[torch.Tensor, torch.Tensor]:
        clf = as_classifier(net)
        x_tilde = self.perturb(clf, to_device(data, head_device(clf)))
        logits = clf.head(head_features(clf, x_tilde)).float() / self.temperature
        conf, pred = torch.softmax(logits, dim=1).max(dim=1)
        return pred, conf


class MahalanobisPostprocessor(_FeaturePostprocessor):
    """Mahalanobis distance (Lee et al., 2018; OpenOOD "mds"): class-conditional Gaussians with one
    tied covariance, fitted on labelled ID train features (classes absent there are left out)."""

    def __init__(self):
        self.class_means: torch.Tensor | None = None  # [classes seen, D] fp64
        self.precision: torch.Tensor | None = None  # [D, D] fp64
        super().__init__()

    @torch.no_grad()
    def setup(self, net, id_loader_dict, ood_loader_dict=None) -> None:
        clf = as_classifier(net)
        z, y = id_features(clf, id_loader_dict, labels=True)
        classes = clf.head.out_features
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ValueError(
                f"id_loader_dict: labels must be in [0, {classes}), got [{int(y.min())}, {int(y.max())}]"
            )
        counts = torch.bincount(y, minlength=classes)
        sums = torch.zeros(classes, z.shape[1], dtype=z.dtype).index_add_(0, y, z)
        means = sums / counts.clamp_min(1)[:, None]
        centered = z - means[y]
        covariance = centered.t() @ centered / z.shape[0]
        self.class_means = means[counts > 0]  # a class without ID samples has no Gaussian to score
        self.precision = torch.linalg.pinv(covariance, hermitian=True)
        self.setup_flag = True

    def feature_score(self, z: torch.Tensor) -> torch.Tensor:
        diff = z.double().cpu()[:, None, :] - self.class_means[None]  # [N, C, D]
        distances = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return (-distances).max(dim=1).values.float().to(z.device)


def _normalized(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


class KNNPostprocessor(_FeaturePostprocessor):
    """Deep nearest neighbours (Sun et al., 2022): negative squared distance of the normalized
    feature to its K-th nearest normalized ID train feature. The bank holds every ID feature
    passed to setup (the paper subsamples ImageNet's: pass fewer batches for that)."""

    hyperparameters = ("K",)
    sweep: ClassVar[dict[str, list]] = {"K": [50, 100, 200, 500, 1000]}

    def __init__(self, K: int = 50):
        self.bank: torch.Tensor | None = None  # [N, D] fp32, unit rows
        super().__init__(K=K)

    def configure(self, K: int) -> None:
        self.K = _count(K, "K")

    @torch.no_grad()
    def setup(self, net, id_loader_dict, ood_loader_dict=None) -> None:
        clf = as_classifier(net)
        z, _ = id_features(clf, id_loader_dict)
        self.bank = _normalized(z).float().to(head_device(clf))
        self.setup_flag = True

    def feature_score(self, z: torch.Tensor) -> torch.Tensor:
        if self.K > self.bank.shape[0]:
            raise ValueError(f"K = {self.K} exceeds the {self.bank.shape[0]} ID features of setup")
        q = _normalized(z.float()).to(self.bank.device)
        bank = self.bank
        squared = (q.square().sum(1, keepdim=True) + bank.square().sum(1) - 2 * q @ bank.t()).clamp_min(0)
        return -squared.topk(self.K, dim=1, largest=False).values[:, -1].to(z.device)


class ViMPostprocessor(_FeaturePostprocessor):
    """ViM (Wang et al., 2022): energy minus a virtual logit, the norm of the feature's residual
    outside the principal subspace of ID train features (in coordinates centered at −W⁺b)."""

    hyperparameters = ("dim",)
    sweep: ClassVar[dict[str, list]] = {"dim": [256, 1000]}

    def __init__(self, dim: int = 256):
        self.weight: torch.Tensor | None = None  # the head, [C, D] and [C] fp64
        self.bias: torch.Tensor | None = None
        self.origin: torch.Tensor | None = None  # [D] fp64
        self.eigenvectors: torch.Tensor | None = None  # [D, D] fp64, columns by decreasing eigenvalue
        self.residual: torch.Tensor | None = None  # [D, D − dim]
        self.alpha: float | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None  # (z − o, max logit) for alpha
        super().__init__(dim=dim)

    def configure(self, dim: int) -> None:
        self.dim = _count(dim, "dim")
        self.residual = self.alpha = None  # refitted from the kept ID statistics on next use

    def _fit_residual(self) -> None:
        centered, max_logit = self._train
        if self.dim >= centered.shape[1]:
            raise ValueError(f"dim must be below the feature size {centered.shape[1]}, got {self.dim}")
        self.residual = self.eigenvectors[:, self.dim:]
        self.alpha = float(max_logit.mean() / (centered @ self.residual).norm(dim=1).mean())

    @torch.no_grad()
    def setup(self, net, id_loader_dict, ood_loader_dict=None) -> None:
        clf = as_classifier(net)
        z, _ = id_features(clf, id_loader_dict)
        # The head as of setup (OpenOOD reads it once too), fp64 on CPU like the other statistics.
        w = clf.head.weight.detach().double().cpu()
        bias = clf.head.bias
        b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias.detach().double().cpu()
        self.weight, self.bias = w, b
        self.origin = -(torch.linalg.pinv(w) @ b)
        centered = z - self.origin
        _, eigenvectors = torch.linalg.eigh(centered.t() @ centered / z.shape[0])
        self.eigenvectors = eigenvectors.flip(1)  # eigh sorts ascending
        self._train = (centered, (z @ w.t() + b).max(dim=1).values)
        self.residual = self.alpha = None
        self.setup_flag = True

    def feature_score(self, z: torch.Tensor) -> torch.Tensor:
        if self.residual is None:
            self._fit_residual()
        zd = z.double().cpu()
        logits = zd @ self.weight.t() + self.bias
        virtual = self.alpha * ((zd - self.origin) @ self.residual).norm(dim=1)
        return (torch.logsumexp(logits, dim=1) - virtual).float().to(z.device)


class GENPostprocessor(Postprocessor):
    """Generalized entropy (Liu et al., 2023): conf = −Σ over the M largest softmax probabilities
    of p^γ (1 − p)^γ (M is capped at the number of classes)."""

    hyperparameters = ("gamma", "M")
    sweep: ClassVar[dict[str, list]] = {
        "gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10],
        "M": [10, 50, 100, 200, 500, 1000],
    }

    def __init__(self, gamma: float = 0.1, M: int = 100):
        super().__init__(gamma=gamma, M=M)

    def configure(self, gamma: float, M: int) -> None:
        self.gamma = check_number(gamma, "gamma", 0.0, math.inf, include_high=False)
        self.M = _count(M, "M")

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1)
        top = p.topk(min(self.M, p.shape[1]), dim=1).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(dim=1)
