"""AdaSCALE (Regmi, 2025): SCALE with a per-sample percentile set by how unstable the features are.

For a classifier with penultimate features z = f(x) [D] and a linear head (W, b):

1. Perturbation. g = ∂ max_c logit_c / ∂x. The fraction o (5 %) of x's elements with the SMALLEST
   |g| (per sample, ties by index) move by ε·sign(g) (ε = 0.5, in the model's input units; an
   element with g = 0 stays): x̃ = x + ε·sign(g)·mask. A second forward gives z̃ = f(x̃).
2. Shift statistic, over the top positions of the original z:
       Q   = Σ_{j ∈ top-k1(z)} |z_j − z̃_j|        k1 = max(1, int(D·1/100))   (top 1 %)
       C_o = Σ_{j ∈ top-k2(z)} relu(z̃_j)          k2 = max(1, int(D·5/100))   (top 5 %)
       Q'  = C_o + λ·Q                             λ = 10
   The public reference code swaps the roles of k1 and k2 between fitting and testing; we use the
   paper's and OpenOOD's consistent choice, Q over the top 1 % and C_o over the top 5 %, in both.
3. ID statistics. F = the empirical CDF of Q' over ID samples, right-continuous:
   F(q) = #{Q'_ID ≤ q} / N_ID.
4. Adaptive percentile. p = p_min + (1 − F(Q'))·(p_max − p_min) (defaults 60 and 85): an OOD-like
   sample (large shift, F ≈ 1) gets p ≈ p_min, so more elements are kept and r is smaller.
5. Scaling with k = D − round(D·p/100) per row, r = Σ relu(z) / Σ top-k relu(z):
       AdaSCALE-A: logits = W (z·e^r) + b = e^r·(W z) + b
       AdaSCALE-L: logits = r²·(W z + b)
   computed by `scaled_logits` without writing the shaped features; score = energy(logits).

Cost per batch: one forward with autograd, one backward to the input, one more forward. Put the
model in eval mode first (batch norm in train mode would mix samples and change the statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..ops import adascale_stats
from ._checks import check_number
from .adapters import Classifier, head_features
from .heads import scaled_logits

VARIANTS = ("a", "l")


def _percentile_range(p_min, p_max) -> tuple[float, float]:
    p_min = check_number(p_min, "p_min", 0.0, 100.0, include_high=False)
    p_max = check_number(p_max, "p_max", 0.0, 100.0, include_high=False)
    if p_min > p_max:
        raise ValueError(f"p_min must be <= p_max, got p_min={p_min}, p_max={p_max}")
    return p_min, p_max


def continuous_input(clf: Classifier, x) -> tuple[torch.Tensor, torch.Tensor | None, Callable]:
    """(the float input to perturb, its real-element mask [N, M] or None, a function that turns a
    tensor like it back into model inputs). Text classifiers (with `embed`) give their token
    embeddings, whose padded positions are masked out."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()) and callable(getattr(clf, "embed", None)):
        inputs = clf.embed(x)
        emb = inputs["inputs_embeds"]
        mask = inputs.get("attention_mask")
        valid = None
        if mask is not None:  # [N, T] tokens -> [N, T·H] embedding elements
            valid = mask.to(emb.device).bool()[..., None].expand_as(emb).reshape(emb.shape[0], -1)
        return emb, valid, lambda t: {**inputs, "inputs_embeds": t}
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor of model inputs, got {got}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [N, ...] of model inputs, got shape {tuple(x.shape)}")
    return x, None, lambda t: t


def perturb_input(
    clf: Classifier, x, fraction: float = 0.05, epsilon: float = 0.5
) -> tuple[torch.Tensor, object]:
    """(z, x̃): the features of x (detached) and x with its int(M·fraction) least-attributed
    elements per sample (M = elements per sample, ranked by |∂ max logit / ∂x|) moved by
    epsilon·sign(grad). Works under torch.no_grad (it enables grad locally). For a text classifier
    x̃ is its inputs with perturbed token embeddings, and M counts real (unpadded) tokens only."""
    fraction = check_number(fraction, "fraction", 0.0, 1.0)
    epsilon = check_number(epsilon, "epsilon", 0.0, math.inf, include_high=False)
    x, valid, rebuild = continuous_input(clf, x)
    per_sample = math.prod(x.shape[1:])
    elements = torch.full((x.shape[0],), per_sample) if valid is None else valid.sum(1).cpu()
    count = (elements.double() * fraction).floor().long()
    if bool((count < 1).any()):
        raise ValueError(
            f"fraction {fraction} of {int(elements.min())} input elements per sample perturbs nothing"
        )
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = head_features(clf, rebuild(x))
        # The gradient of each sample's own max logit: samples are independent (eval mode), so one
        # backward of the sum gives every per-sample gradient.
        top_logit = clf.head(z).max(dim=1).values.sum()
        (grad,) = torch.autograd.grad(top_logit, x)
    flat = grad.reshape(x.shape[0], per_sample)
    magnitude = flat.abs() if valid is None else flat.abs().masked_fill(~valid, math.inf)
    # A stable sort ranks equal |grad| by index, so ties are broken deterministically.
    order = torch.sort(magnitude, dim=1, stable=True).indices
    chosen = torch.arange(per_sample, device=flat.device) < count.to(flat.device)[:, None]
    mask = torch.zeros_like(flat).scatter_(1, order, chosen.to(flat.dtype))
    x_tilde = x.detach() + (epsilon * torch.sign(flat) * mask).view_as(x)
    return z.detach(), rebuild(x_tilde)


def shift_statistic(
    z: torch.Tensor, z_tilde: torch.Tensor, lam: float = 10.0, k1: float = 1.0, k2: float = 5.0
) -> torch.Tensor:
    """Q' = C_o + lam·Q per sample (fp32 [N]); Q over the top k1 % and C_o over the top k2 % of z
    (counts max(1, int(D·k/100)))."""
    d = z.shape[1]
    n1 = max(1, int(d * check_number(k1, "k1", 0.0, 100.0) / 100))
    n2 = max(1, int(d * check_number(k2, "k2", 0.0, 100.0) / 100))
    q, c_o = adascale_stats(z, z_tilde, n1, n2)
    return c_o + check_number(lam, "lam", 0.0, math.inf, include_low=True, include_high=False) * q


class EmpiricalCDF:
    """F(q) = #{samples ≤ q} / N (right-continuous), by binary search in the sorted samples."""

    def __init__(self, samples: torch.Tensor):
        if not isinstance(samples, torch.Tensor) or samples.dim() != 1 or samples.numel() == 0:
            raise ValueError("samples must be a non-empty 1-D tensor")
        if not bool(torch.isfinite(samples).all()):
            raise ValueError("samples must be finite (got NaN or Inf)")
        self.sorted = torch.sort(samples.detach()).values

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        q = q.to(device=self.sorted.device, dtype=self.sorted.dtype)
        return torch.searchsorted(self.sorted, q, right=True).double() / self.sorted.numel()


def adaptive_percentile(cdf_values: torch.Tensor, p_min: float, p_max: float) -> torch.Tensor:
    """p = p_min + (1 − F)·(p_max − p_min), float64, clamped to [p_min, p_max] ⊂ (0, 100) against
    rounding."""
    p_min, p_max = _percentile_range(p_min, p_max)
    p = p_min + (1.0 - cdf_values.double()) * (p_max - p_min)
    return p.clamp(p_min, p_max)


class AdaScale:
    """AdaSCALE-A (variant "a") or AdaSCALE-L ("l") for any Classifier; `fit` on ID inputs, then
    `logits(clf, x)`. Defaults are the paper's.

    Args:
        p_min, p_max: the range of the per-sample percentile, in (0, 100): the most OOD-like sample
            (F(Q') = 1) gets p_min, the most ID-like (F = 0) p_max. Default 60 and 85.
        variant: "a" scales the logits' W·z term by e^r (AdaSCALE-A), "l" scales the whole logits
            by r² (AdaSCALE-L).
        lam: λ, the weight of the feature shift Q against the perturbed activation mass C_o in
            Q' = C_o + λ·Q (>= 0; 0 uses C_o only). Default 10.
        fraction: o, the share of each sample's input elements that get perturbed: those with the
            smallest |∂ max logit / ∂x| (in [0, 1]; 0 perturbs nothing, so Q = 0). Default 0.05.
        epsilon: ε, how far each perturbed input element moves, ε·sign(grad), in the model's input
            units (after its normalisation; > 0). Default 0.5.
        k1, k2: the top shares of z, in percent of D, over which Q and C_o are summed
            (k = max(1, int(D·k/100))). Defaults 1 and 5.
    """

    def __init__(
        self,
        p_min: float = 60.0,
        p_max: float = 85.0,
        *,
        variant: str = "a",
        lam: float = 10.0,
        fraction: float = 0.05,
        epsilon: float = 0.5,
        k1: float = 1.0,
        k2: float = 5.0,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.set_range(p_min, p_max)
        self.variant = variant
        self.lam = check_number(lam, "lam", 0.0, math.inf, include_low=True, include_high=False)
        self.fraction = check_number(fraction, "fraction", 0.0, 1.0)
        self.epsilon = check_number(epsilon, "epsilon", 0.0, math.inf, include_high=False)
        self.k1 = check_number(k1, "k1", 0.0, 100.0)
        self.k2 = check_number(k2, "k2", 0.0, 100.0)
        self.cdf: EmpiricalCDF | None = None

    def set_range(self, p_min: float, p_max: float) -> None:
        """Sets the percentile range (no refit needed: F depends only on the ID statistics)."""
        self.p_min, self.p_max = _percentile_range(p_min, p_max)

    def statistic(self, clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, Q'): the features of x and their shift statistic."""
        z, x_tilde = perturb_input(clf, x, self.fraction, self.epsilon)
        with torch.no_grad():
            z_tilde = clf.features(x_tilde)
        return z, shift_statistic(z, z_tilde, self.lam, self.k1, self.k2)

    def fit(self, clf: Classifier, inputs: Iterable[torch.Tensor]) -> AdaScale:
        """Fits F on the Q' of every ID sample in `inputs` (batches of model inputs). The reference
        keeps a random 5,000 of them; F changes little with fewer (paper, Table 7), so pass fewer
        batches to bound the cost."""
        stats = [self.statistic(clf, x)[1] for x in inputs]
        if not stats:
            raise ValueError("inputs must yield at least one batch of ID samples")
        self.cdf = EmpiricalCDF(torch.cat(stats))
        return self

    def percentile(self, q_prime: torch.Tensor) -> torch.Tensor:
        """The per-sample percentile p (float64 [N]) for shift statistics Q'."""
        if self.cdf is None:
            raise RuntimeError("AdaScale.fit must run on ID samples before percentile/logits")
        return adaptive_percentile(self.cdf(q_prime), self.p_min, self.p_max)

    def logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """fp32 AdaSCALE logits [N, C] of a batch of inputs."""
        z, q_prime = self.statistic(clf, x)
        p = self.percentile(q_prime)
        with torch.no_grad():
            return scaled_logits(z, clf.head.weight, clf.head.bias, p, f"adascale_{self.variant}")
