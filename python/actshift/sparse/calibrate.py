"""Threshold calibration (TEAL / CATS), simulated sparsification and realized-sparsity reports.

Thresholds are quantiles of |x| per (layer, site), read from a fine streaming histogram: bin 0
counts exact zeros, then 2^16 bins equally spaced in log2|x| over [2^-40, 2^40] (values outside are
clamped into the end bins), so one pass over the data suffices and a quantile is located to within
a factor 2^(80/65536) = 1.00085 (0.085% relative), interpolated geometrically inside its bin. Unlike
TEAL's signed-histogram icdf this needs no symmetry assumption.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from . import sites as _sites
from .thresholds import Thresholds

LOG2_LO, LOG2_HI, NBINS = -40.0, 40.0, 1 << 16
_SCALE = NBINS / (LOG2_HI - LOG2_LO)
MAX_SITE_SPARSITY = 0.99  # the greedy allocation never zeroes a site completely


class Histogram:
    """Streaming histogram of |x| (zeros apart, then log-spaced bins), on the CPU in int64."""

    def __init__(self):
        self.counts = torch.zeros(NBINS + 1, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        # log2(0) = -inf -> bin 0; NaN (never zeroed by a threshold) and huge values -> the last bin.
        pos = ((torch.log2(a) - LOG2_LO) * _SCALE).nan_to_num(nan=NBINS, posinf=NBINS, neginf=-1.0)
        idx = (pos.floor().clamp(-1, NBINS - 1) + 1).long()
        self.counts += torch.bincount(idx, minlength=NBINS + 1).cpu()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, s: float) -> float:
        """The smallest t with (fraction of |x| <= t) >= s, interpolated inside its bin; 0 when the
        zeros alone reach s."""
        total = self.total
        if total == 0:
            raise ValueError("batches: a site saw no activations (empty batches?)")
        cdf = torch.cumsum(self.counts, 0).double() / total
        if s <= cdf[0].item():
            return 0.0
        b = int(torch.searchsorted(cdf, torch.tensor([s], dtype=torch.float64)).item())
        b = min(b, NBINS)
        below = cdf[b - 1].item()
        frac = (s - below) / max(cdf[b].item() - below, 1e-300)
        lo = LOG2_LO + (b - 1) / _SCALE
        return float(2.0 ** (lo + min(max(frac, 0.0), 1.0) / _SCALE))

    def fraction_at_or_below(self, t: float) -> float:
        """Approximate share of |x| <= t (exact for t = 0)."""
        total = self.total
        if t <= 0:
            return self.counts[0].item() / total
        pos = (math.log2(t) - LOG2_LO) * _SCALE
        b = int(min(max(math.floor(pos), -1), NBINS - 1)) + 1
        inside = min(max(pos - (b - 1), 0.0), 1.0)
        return (self.counts[:b].sum().item() + inside * self.counts[b].item()) / total


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


# progress=None ("auto"): the bar appears only once the work has run this long, so short calls
# (a few batches) stay quiet; True shows it at once, False never.
PROGRESS_DELAY_S = 1.0


def progress_bar(iterable: Iterable, progress: bool | None, desc: str) -> Iterable:
    """`iterable` wrapped in a tqdm bar per `progress` (True, False, None = auto, see above)."""
    if progress is False:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with transformers; without it, no bar
        return iterable
    return tqdm(iterable, desc=desc, leave=False, delay=0.0 if progress else PROGRESS_DELAY_S)


def run_batches(model: nn.Module, batches: Iterable, *, progress: bool | None = False, desc: str = "") -> int:
    """Runs `model` without grad on each batch (a tensor of input_ids, or a dict of model kwargs);
    returns how many ran. ValueError naming `batches` when there are none or one is malformed."""
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]
    it = progress_bar(batches, progress, desc)
    # No KV cache: calibration replays layers, which must not append to a cache the pass created.
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    n = 0
    with torch.no_grad():
        for batch in it:
            if isinstance(batch, torch.Tensor):
                model(input_ids=batch, **extra)
            elif isinstance(batch, dict):
                model(**{**extra, **batch})
            else:
                raise TypeError(f"batches: each batch must be a tensor of input_ids or a dict of model kwargs, got {type(batch).__name__}")
            n += 1
    if n == 0:
        raise ValueError("batches: no batches given")
    return n


@contextlib.contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (no dropout) for an observation pass; its training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    return x * (x.abs() > t)


def _site_modules(layer: _sites.Layer, site: str) -> list[nn.Module]:
    """The modules whose input (TEAL) or output (CATS: the activation module) is the site."""
    if site == _sites.CATS_SITE:
        return [layer.module.get_submodule(layer.arch.act)]
    return [m for _, m in layer.linears(site)]


def _install(layer: _sites.Layer, site: str, fn, *, observe_only: bool) -> list:
    """Hooks `fn(x) -> x'` onto the site: pre-hooks on the site's linears (TEAL), a forward hook on
    the MLP's activation (CATS). With observe_only, only the first linear is hooked (they share x)."""
    mods = _site_modules(layer, site)
    if observe_only:
        mods = mods[:1]
    if site == _sites.CATS_SITE:
        return [m.register_forward_hook(lambda mod, args, out: fn(out)) for m in mods]
    return [m.register_forward_pre_hook(lambda mod, args: (fn(args[0]), *args[1:])) for m in mods]


@contextlib.contextmanager
def simulate(model: nn.Module, thresholds: Thresholds):
    """Context manager: the model computes as if sparsified (x -> x·(|x| > t) at every site, prefill
    and decode alike), with plain PyTorch hooks. For quality measurements; no speedup."""
    arch = _sites.family(model)
    lays = _sites.layers(model)
    thresholds.check_model(lays, arch)
    handles = []
    for (i, site), t in thresholds.values.items():
        handles += _install(lays[i], site, lambda x, t=t: _threshold(x, t), observe_only=False)
    with _hooks(handles):
        yield model


def _collect(model, lays, names, batches, progress, capture_layers: bool):
    hists = {(layer.index, s): Histogram() for layer in lays for s in names}
    captured: dict[int, list] = {layer.index: [] for layer in lays} if capture_layers else {}
    handles = []
    for layer in lays:
        for s in names:
            def observe(x, h=hists[(layer.index, s)]):
                h.add(x)
                return x
            handles += _install(layer, s, observe, observe_only=True)
        if capture_layers:
            def grab(mod, args, kwargs, i=layer.index):
                captured[i].append((args, kwargs))
            handles.append(layer.module.register_forward_pre_hook(grab, with_kwargs=True))
    with _hooks(handles):
        run_batches(model, batches, progress=progress, desc="actshift calibrate")
    return hists, captured


def calibrate(model: nn.Module, batches: Iterable, target_sparsity: float, sites=_sites.TEAL_SITES, *,
              greedy: bool = False, greedy_step: float = 0.01, progress: bool | None = None) -> Thresholds:
    """Thresholds that zero `target_sparsity` of the activations at each (layer, site).

    model: a transformers model (Llama, Mistral, Qwen2/3, GPT-2, BERT, OPT), in eval mode.
    batches: tensors of input_ids or dicts of model kwargs (prefill-sized calibration data).
    sites: any of ("qkv", "o", "gate_up", "down") (TEAL: the inputs of the linears), or "cats"
        (|act(gate)| of a gated MLP, CATS).
    greedy: TEAL's block-wise allocation. Per layer, starting dense, repeatedly raise the sparsity of
        the site whose increase least perturbs the layer's output (relative L2 error vs dense on
        the calibration tokens), each step adding `greedy_step` to the layer's parameter-weighted
        sparsity, until it equals the target. Sites read by more weights end up sparser when the
        block tolerates it. Without greedy every site gets the target (uniform).
    progress: a tqdm bar over the batches (and layers, for greedy): True, False, or None (default)
        to show it only once the work has taken more than a second.

    Thresholds are histogram quantiles (see the module docstring: 0.085% relative resolution).
    """
    arch = _sites.family(model)
    names = _sites.check_sites(sites, arch)
    target = _check_fraction(target_sparsity, "target_sparsity")
    if greedy:
        if names == (_sites.CATS_SITE,):
            raise ValueError("greedy: the allocation spreads sparsity across TEAL sites; CATS has one site per layer")
        if isinstance(greedy_step, bool) or not isinstance(greedy_step, numbers.Real) or not 0 < greedy_step <= 0.5:
            raise ValueError(f"greedy_step must be in (0, 0.5], got {greedy_step!r}")
    lays = _sites.layers(model)
    with eval_mode(model):
        hists, captured = _collect(model, lays, names, batches, progress, capture_layers=greedy)
        if greedy:
            sparsity = _greedy(lays, names, hists, captured, target, float(greedy_step), progress)
        else:
            sparsity = {k: target for k in hists}
    values = {k: hists[k].quantile(s) for k, s in sparsity.items()}
    meta = {"model_type": model.config.model_type, "method": "greedy" if greedy else "uniform",
            "histogram": f"log2 bins {NBINS} over [2^{LOG2_LO:g}, 2^{LOG2_HI:g}]"}
    return Thresholds(values, target=target, sparsity=sparsity, meta=meta)


def _layer_output(layer: nn.Module, args, kwargs) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _greedy(lays, names, hists, captured, target, step, progress) -> dict:
    result = {}
    it = progress_bar(lays, progress, "actshift greedy")
    with torch.no_grad():
        for layer in it:
            calls = captured[layer.index]
            dense = [_layer_output(layer.module, a, k) for a, k in calls]
            norm = sum(float(d.float().pow(2).sum()) for d in dense) or 1.0
            weights = {s: _sites.site_params(layer, s) for s in names}
            total_w = sum(weights.values())
            s_now = {s: 0.0 for s in names}

            def error(trial):
                thr = {s: hists[(layer.index, s)].quantile(v) for s, v in trial.items()}
                handles = []
                for s in names:
                    if trial[s] > 0:
                        handles += _install(layer, s, lambda x, t=thr[s]: _threshold(x, t), observe_only=False)
                with _hooks(handles):
                    outs = [_layer_output(layer.module, a, k) for a, k in calls]
                return sum(float((o.float() - d.float()).pow(2).sum()) for o, d in zip(outs, dense)) / norm

            def effective(sp):
                return sum(weights[s] * sp[s] for s in names) / total_w

            while effective(s_now) < target - 1e-9:
                need = target - effective(s_now)
                best, best_err = None, math.inf
                for s in names:
                    if s_now[s] >= MAX_SITE_SPARSITY:
                        continue
                    trial = dict(s_now)
                    trial[s] = min(MAX_SITE_SPARSITY, s_now[s] + min(step, need) * total_w / weights[s])
                    err = error(trial)
                    if err < best_err:
                        best, best_err = trial, err
                if best is None:  # every site at the cap: the target is out of reach
                    break
                s_now = best
            for s in names:
                result[(layer.index, s)] = s_now[s]
    return result


class SparsityTable(dict):
    """{(layer, site or module): fraction} with `mean` (weighted as documented by the producer)
    and a printable table."""

    def __init__(self, data: dict, mean: float, title: str):
        super().__init__(data)
        self.mean = mean
        self.title = title

    def __str__(self) -> str:
        order = {c: i for i, c in enumerate((*_sites.TEAL_SITES, _sites.CATS_SITE))}
        cols = sorted({k[1] for k in self}, key=lambda c: (order.get(c, len(order)), str(c)))
        rows = sorted({k[0] for k in self})
        lines = [self.title, f"{'layer':>6}" + "".join(f"{c:>10}" for c in cols)]
        for r in rows:
            lines.append(f"{r:>6}" + "".join(f"{100 * self[(r, c)]:>9.1f}%" if (r, c) in self else f"{'-':>10}" for c in cols))
        lines.append(f"mean {100 * self.mean:.1f}%")
        return "\n".join(lines)


def realized_sparsity(model: nn.Module, thresholds: Thresholds, batches: Iterable, *, progress: bool = False) -> SparsityTable:
    """Share of activations zeroed at each (layer, site) on `batches` (e.g. held-out data), measured
    while the model runs sparsified (so upstream sparsity shifts downstream inputs, as deployed).
    `mean` weights each site by the weight parameters that read it (TEAL's effective sparsity).
    Thresholds are calibrated on dense activations, so sites downstream of sparsified ones (o,
    down) typically come out a few points sparser than calibrated."""
    arch = _sites.family(model)
    lays = _sites.layers(model)
    thresholds.check_model(lays, arch)
    counts = {k: [0, 0] for k in thresholds.values}
    handles = []
    for (i, site), t in thresholds.values.items():
        def count(x, t=t, c=counts[(i, site)]):
            c[0] += int((x.abs() <= t).sum())
            c[1] += x.numel()
            return x
        handles += _install(lays[i], site, count, observe_only=True)
    with eval_mode(model), simulate(model, thresholds), _hooks(handles):
        run_batches(model, batches, progress=progress, desc="actshift realized_sparsity")
    frac = {k: c[0] / max(c[1], 1) for k, c in counts.items()}
    if thresholds.mode == "cats":
        w = {k: 1 for k in frac}
    else:
        w = {(i, s): _sites.site_params(lays[i], s) for i, s in frac}
    mean = sum(frac[k] * w[k] for k in frac) / sum(w.values())
    return SparsityTable(frac, mean, f"realized sparsity ({thresholds.mode}), % of activations zeroed")
