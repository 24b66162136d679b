"""Per-instance module swaps: `patch_sparsity` (TEAL SparseLinear / CATS MLP), `patch_ffn`
(exact ReLU-sparse FFNs) and `unpatch`.

Every swap replaces one attribute of one module instance (never a class), validates everything
before changing anything, and records an undo that puts the original module objects back. With a
`handle` (actshift.patch's PatchHandle) the undo goes to `handle.add_undo`; without one it is kept
on the model for `actshift.sparse.unpatch(model)`.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import sites as _sites
from .cats import CatsMLP
from .ffn import ReluFFN, ReluGatedMLP
from .linear import Counters, SparseLinear
from .relufy import FATReLU, set_submodule
from .thresholds import Thresholds

_UNDO_ATTR = "_actshift_sparse_undo"
_SWAPPED = (SparseLinear, CatsMLP, ReluGatedMLP, ReluFFN)


def _apply(model: nn.Module, swaps: list[tuple[nn.Module, str, nn.Module]], handle) -> Callable[[], None]:
    """Performs the swaps (root, path, new) and registers one undo that restores the originals."""
    old = [(root, path, root.get_submodule(path)) for root, path, _ in swaps]
    for root, path, new in swaps:
        set_submodule(root, path, new)
    done = []

    def undo() -> None:
        if done:  # idempotent: a handle and unpatch(model) may both hold it
            return
        done.append(True)
        for root, path, module in reversed(old):
            set_submodule(root, path, module)

    if handle is not None:
        handle.add_undo(undo)
    else:
        model.__dict__.setdefault(_UNDO_ATTR, []).append(undo)
    return undo


def _check_free(layer: _sites.Layer, path: str) -> nn.Module:
    try:
        m = layer.module.get_submodule(path)
    except AttributeError:
        raise ValueError(f"model: layer {layer.index} has no {path} (already swapped by another patch?); unpatch first") from None
    if isinstance(m, (*_SWAPPED, nn.Identity)):
        raise ValueError(f"model: layer {layer.index} {path} is already swapped ({type(m).__name__}); unpatch first")
    return m


def _backend(backend, handle) -> str:
    return backend or getattr(handle, "backend", None) or "auto"


def _is_silu(m: nn.Module) -> bool:
    return isinstance(m, nn.SiLU) or type(m).__name__ == "SiLUActivation"


def patch_sparsity(model: nn.Module, thresholds: Thresholds, handle=None, *, prefill: str = "dense",
                   backend: str | None = None) -> Callable[[], None]:
    """Swaps the linears at each calibrated (layer, site) for SparseLinear (TEAL thresholds), or each
    layer's MLP for CatsMLP (CATS thresholds), in place. Returns the undo callable (also recorded).

    Decode steps (one token per sequence, <= 16 rows) run the sparse kernels; prefill runs the
    original modules exactly (prefill="sparse" thresholds it too, for quality evaluation).
    Threshold 0 keeps every nonzero input, so the model computes what it did (within fp32 rounding).
    Supported: Llama, Mistral, Qwen2/3, OPT (nn.Linear), GPT-2 (Conv1D), BERT.
    """
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be an actshift.sparse.Thresholds, got {type(thresholds).__name__}")
    if prefill not in ("dense", "sparse"):
        raise ValueError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
    lays = _sites.layers(model)
    thresholds.check_model(lays, _sites.family(model))
    be = _backend(backend, handle)
    swaps = []
    for (i, site), t in sorted(thresholds.values.items()):
        layer = lays[i]
        if site == _sites.CATS_SITE:
            path = layer.arch.ffn_linears[0]
            mlp = _check_free(layer, path)
            act = _check_free(layer, layer.arch.act)
            if not _is_silu(act):
                raise ValueError(f"thresholds: CATS needs a SiLU MLP; layer {i} has {type(act).__name__}")
            swaps.append((layer.module, path, CatsMLP(mlp, t, prefill=prefill, backend=be)))
            continue
        for path in layer.arch.linears[site]:
            swaps.append((layer.module, path, SparseLinear(_check_free(layer, path), t, prefill=prefill, backend=be)))
    return _apply(model, swaps, handle)


def relu_act(m: nn.Module) -> tuple[str, float] | None:
    """(relu_ffn act name, threshold) of a ReLU-family activation module, None for anything else."""
    if isinstance(m, FATReLU):
        return "fatrelu", m.threshold
    if type(m) is nn.ReLU:
        return "relu", 0.0
    if type(m).__name__ == "ReLUSquaredActivation":
        return "relu2", 0.0
    return None


def patch_ffn(model: nn.Module, mode: str = "relu_sparse", handle=None, *, backend: str | None = None) -> Callable[[], None]:
    """Swaps every layer's FFN for one that skips inactive neurons exactly (actshift.relu_ffn at
    decode, the original FFN otherwise), in place. Returns the undo callable (also recorded).

    mode: "relu_sparse" (the only mode). The FFN activation must be ReLU-family: nn.ReLU
    (hidden_act "relu"), "relu2", or a FATReLU set by relufy; anything else (SiLU, GELU) raises
    ValueError, since skipping is exact only when inactive neurons output exactly 0.
    Llama/Mistral/Qwen gated MLPs are swapped whole; for OPT, GPT-2 and BERT the first FFN linear
    becomes the fused FFN and the activation and second linear become nn.Identity, so dropout,
    residual and LayerNorm stay the model's own code.
    """
    if mode != "relu_sparse":
        raise ValueError(f"mode must be 'relu_sparse', got {mode!r}")
    arch = _sites.family(model)
    if arch.ffn is None:
        raise ValueError(f"model: {arch.name} FFNs cannot be swapped for ReLU-sparse ones (no plain or gated FFN entry)")
    be = _backend(backend, handle)
    swaps = []
    for layer in _sites.layers(model):
        for path in arch.ffn_linears:
            _check_free(layer, path)
        act_mod = _check_free(layer, arch.act)
        act = relu_act(act_mod)
        if act is None:
            raise ValueError(
                f"model: layer {layer.index} FFN activation is {type(act_mod).__name__}, not ReLU-family "
                "(relu, relu2, FATReLU): exact skipping needs exact zeros. Convert with actshift.sparse.relufy "
                "(lossy) or use calibrated thresholds with patch_sparsity")
        if arch.ffn == "gated":
            mlp = arch.ffn_linears[0]
            swaps.append((layer.module, mlp, ReluGatedMLP(layer.module.get_submodule(mlp), *act, backend=be)))
            continue
        first, second = arch.ffn_linears
        fc1, fc2 = _check_free(layer, first), _check_free(layer, second)
        swaps += [(layer.module, first, ReluFFN(fc1, act_mod, fc2, *act, backend=be)),
                  (layer.module, arch.act, nn.Identity()),
                  (layer.module, second, nn.Identity())]
    return _apply(model, swaps, handle)


def counters(model: nn.Module, *, count_zeros: bool | None = None, reset: bool = False) -> dict[str, Counters]:
    """The live `Counters` of every swapped module, {module path: Counters}: how many calls took the
    sparse kernel and how many the original module, so you can confirm the kernels ran.
    count_zeros=True (False) turns on (off) counting the inputs each SparseLinear zeroed, for the
    realized sparsity of the decode steps (`Counters.sparsity`); reset=True zeroes the counts."""
    out = {name: m.counters for name, m in model.named_modules() if isinstance(m, _SWAPPED)}
    for c in out.values():
        if reset:
            c.reset()
        if count_zeros is not None:
            c.count_zeros = bool(count_zeros)
    return out


def unpatch(model: nn.Module) -> int:
    """Undoes every patch_sparsity / patch_ffn made on `model` without a handle, newest first,
    restoring the original module objects. Returns how many patches were undone."""
    undos = getattr(model, _UNDO_ATTR, None) or []
    n = len(undos)
    while undos:
        undos.pop()()
    return n
