"""Relufication for experiments (FATReLU / ReLU in place of SiLU/GELU), FATReLU threshold
calibration and the FFN activation-sparsity report."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import sites as _sites
from .calibrate import Histogram, SparsityTable, _check_fraction, _hooks, eval_mode, run_batches
from .thresholds import check_threshold

class FATReLU(nn.Module):
    """ProSparse's FATReLU: x where x > threshold, else 0 (threshold >= 0; 0 is ReLU)."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = check_threshold(threshold, "threshold")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}"


def act_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(layer module, path of its FFN activation, the activation module) per layer."""
    out = []
    for layer in _sites.layers(model):
        path = layer.arch.act
        try:
            out.append((layer.module, path, layer.module.get_submodule(path)))
        except AttributeError:
            raise ValueError(f"model: layer {layer.index} has no FFN activation at {path} (is its FFN patched?)") from None
    return out


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def relufy(model: nn.Module, act: str = "fatrelu", threshold=0.0, handle=None, *, inplace: bool = True) -> nn.Module:
    """Replaces every layer's FFN activation (SiLU, GELU, ...) by ReLU or FATReLU, per instance, and
    returns the model. LOSSY: the converted model computes a different function than the original
    (papers fine-tune after relufication); use it to experiment with ReLU-sparse kernels on models
    that were not trained with ReLU. Emits a UserWarning saying so.

    act: "relu" or "fatrelu". threshold: FATReLU's threshold (a number >= 0, or one per layer);
    see `calibrate_fatrelu` to pick thresholds for a target sparsity.
    inplace: True (default) changes `model` itself and returns it; the swap is undoable like every
    module swap: `sparse.unpatch(model)` (or, with `handle`, `actshift.unpatch`) puts the original
    activation modules back. False relufies a deep copy (the weights are copied too) and leaves
    `model` untouched.
    handle: an actshift.patch handle to register the undo with (as patch_sparsity / patch_ffn do).
    """
    from .patch import _apply

    if act not in ("relu", "fatrelu"):
        raise ValueError(f"act must be 'relu' or 'fatrelu', got {act!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not inplace and handle is not None:
        raise ValueError("handle belongs to the original model; relufy(..., inplace=False) returns an unpatched copy")
    # A patched model's copy would carry undos that act on the original's modules.
    if not inplace and (model.__dict__.get("_actshift_sparse_undo") or model.__dict__.get("_actshift_patch")):
        raise ValueError("model is patched; unpatch it before relufy(..., inplace=False) copies it")
    mods = act_modules(model)
    if isinstance(threshold, (list, tuple)):
        if len(threshold) != len(mods):
            raise ValueError(f"threshold: {len(threshold)} values for {len(mods)} layers")
        ts = [check_threshold(t, f"threshold[{i}]") for i, t in enumerate(threshold)]
    else:
        ts = [check_threshold(threshold, "threshold")] * len(mods)
    if act == "relu" and any(ts):
        raise ValueError("threshold must be 0 with act='relu' (use act='fatrelu')")
    warnings.warn("actshift.sparse.relufy: replacing the FFN activation with ReLU/FATReLU changes the model's "
                  "outputs (lossy vs the original; relufied models are normally fine-tuned)", UserWarning, stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
        mods = act_modules(model)
    _apply(model, [(layer, path, nn.ReLU() if act == "relu" else FATReLU(t)) for (layer, path, _), t in zip(mods, ts)],
           handle)
    return model


def calibrate_fatrelu(model: nn.Module, batches: Iterable, target_sparsity: float, *,
                      progress: bool | None = None) -> list[float]:
    """Sets each layer's FATReLU threshold so that `target_sparsity` of its gate pre-activations are
    at or below it (the activation is then exactly zero), on `batches`; returns the thresholds.
    A layer whose non-positive share already exceeds the target keeps threshold 0 (plain ReLU).
    The model must be relufied with act="fatrelu" first."""
    target = _check_fraction(target_sparsity, "target_sparsity")
    mods = act_modules(model)
    for i, (_, _, m) in enumerate(mods):
        if not isinstance(m, FATReLU):
            raise ValueError(f"model: layer {i} activation is {type(m).__name__}, not FATReLU (relufy(model, 'fatrelu') first)")
    hists = [Histogram() for _ in mods]
    # Non-positive values all land in the zero bin, so quantiles count them as "below any t >= 0".
    handles = [m.register_forward_pre_hook(lambda mod, args, h=h: h.add(args[0].clamp(min=0)))
               for (_, _, m), h in zip(mods, hists)]
    with eval_mode(model), _hooks(handles):
        run_batches(model, batches, progress=progress, desc="actshift calibrate_fatrelu")
    ts = [h.quantile(target) for h in hists]
    for (_, _, m), t in zip(mods, ts):
        m.threshold = t
    return ts


def sparsity_report(model: nn.Module, batches: Iterable, *, progress: bool = False) -> SparsityTable:
    """Per-layer FFN activation sparsity: the fraction of exactly-zero outputs of each layer's FFN
    activation (for gated MLPs, act(gate): the neurons relu_ffn skips) over `batches`. Returns a
    SparsityTable {(layer, "ffn"): fraction} (print it for a table); `mean` is the plain average
    over layers. Run it on an unpatched (possibly relufied) model."""
    mods = act_modules(model)
    counts = [[0, 0] for _ in mods]
    for i, (_, _, m) in enumerate(mods):
        if isinstance(m, nn.Identity):
            raise ValueError(f"model: layer {i} FFN is patched (its activation is nn.Identity); report on the unpatched model")

    def count(mod, args, out, c):
        c[0] += int((out == 0).sum())
        c[1] += out.numel()

    handles = [m.register_forward_hook(lambda mod, a, o, c=c: count(mod, a, o, c)) for (_, _, m), c in zip(mods, counts)]
    with eval_mode(model), _hooks(handles):
        run_batches(model, batches, progress=progress, desc="actshift sparsity_report")
    frac = {(i, "ffn"): c[0] / max(c[1], 1) for i, c in enumerate(counts)}
    return SparsityTable(frac, sum(frac.values()) / len(frac), "FFN activation sparsity, % exactly zero")
