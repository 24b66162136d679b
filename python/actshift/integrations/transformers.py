"""Patch a Hugging Face transformers model in place: `patch(model, steering=...)`, `unpatch(model)`.

Per instance only: the blocks, attention and MLP submodules of THIS model get an instance-level
`forward` that calls the original one and steers its output (or its input, for "block_input");
the class and every other instance stay untouched, and `unpatch` puts back exactly what was there.

Extension point: `FEATURES` maps each keyword of `patch` to a function `patch_x(model, spec, handle)`
that changes the model and registers how to undo it with `handle.add_undo(fn)`; `unpatch` runs the
undos in reverse order. Module swaps (sparsity, ffn) run before steering, so steering wraps the
swapped modules.
"""
from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import backends
from ..ops.steer import runner as steer_runner
from ..ops.steer import steer
from ..steering.plan import SteeringBank, SteeringPlan, as_bank
from . import architectures
from .architectures import SITES

POSITIONS = ("all", "prompt", "generated")


@dataclass(eq=False)
class SteeringSite:
    """One steering instruction: `plan` at `site` of `layers`, on the tokens chosen by `positions`.

    Args:
        plan: a SteeringPlan (every row), or a SteeringBank / list of plans selected per batch row
            by `handle.set_slots(...)` (-1 leaves a row alone).
        layers: a layer index, a sequence of them, or None for every layer (negative counts from the end).
        site: "block_output" (residual stream after the block), "block_input", "attention_output"
            or "mlp_output".
        positions: "all", "prompt" (tokens of the prefill), "generated" (tokens after it), or a bool
            tensor [batch, L] over absolute positions (cache coordinates; positions >= L are not steered).
        name: a key for `handle.set_weights({name: ...})`.
    """

    plan: SteeringPlan | SteeringBank | Sequence[SteeringPlan]
    layers: int | Sequence[int] | None = None
    site: str = "block_output"
    positions: str | torch.Tensor = "all"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}; got {self.site!r}")
        if isinstance(self.positions, torch.Tensor):
            if self.positions.dtype != torch.bool or self.positions.dim() != 2:
                raise TypeError(f"positions as a tensor must be a bool mask [batch, seq], got {self.positions.dtype} "
                                f"with shape {tuple(self.positions.shape)}")
        elif self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)} or a bool mask; got {self.positions!r}")
        self.bank = as_bank(self.plan)  # TypeError for anything else
        self.per_row = not isinstance(self.plan, SteeringPlan)  # banks select plans by slot
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._run: tuple | None = None  # (device, process-wide backend, kernel call) of the last call

    def runner(self, device: torch.device, backend: str):
        """The bank's prepared kernel call on `device` (actshift.ops.steer.runner), kept for the
        next layer and step."""
        last, chosen = self._run, backends.get_backend()
        if last is not None and last[0] == device and last[1] == chosen:
            return last[2]
        run = steer_runner(self.bank, device, backend, "add" if self.bank.is_additive else "program")
        self._run = (device, chosen, run)
        return run

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The positions mask on `device`, copied once (no host-to-device copy per layer and step)."""
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = self.positions.to(device)
        return mask


@dataclass
class Step:
    """What the patched model's current forward processes (given to `on_step` callbacks)."""

    past_length: int  # tokens already in the KV cache
    prompt_length: int | None  # the prefill length (or the pinned one); None before any prefill


class PatchHandle:
    """Returned by `patch`: per-request controls, monitors, and the undo list of the patch.

    Slots and weights are copied into buffers that keep their identity while the shape stays the
    same, so a CUDA graph captured once sees every later update.
    """

    def __init__(self, model: torch.nn.Module, backend: str, prefill: str = "dense"):
        self.model = model
        self.backend = backend
        self.prefill = prefill  # for the sparsity= swaps
        self.sites: list[SteeringSite] = []
        self.monitors: dict[tuple[int, str], object] = {}
        self.step: Step | None = None
        self._undo: list[Callable[[], None]] = []
        self._slots: torch.Tensor | None = None
        self._weights: dict[str | None, torch.Tensor] = {}
        self._callbacks: list[Callable[[PatchHandle, Step], None]] = []
        self._pinned_prompt: int | None = None
        self._seen_prompt: int | None = None  # prompt length of the last prefill
        self._needs_step = False
        self._row_cache: dict[tuple, tuple] = {}  # (site, batch, seq) -> (gate, slot) of this forward

    # --- extension point -------------------------------------------------------------------------

    def add_undo(self, fn: Callable[[], None]) -> None:
        """Registers how to revert one change; `unpatch` calls them last-in, first-out."""
        self._undo.append(fn)

    def unpatch(self) -> None:
        """Restores the model exactly as it was before `patch`."""
        unpatch(self.model)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        if get_handle(self.model) is self:
            unpatch(self.model)

    # --- per-request controls --------------------------------------------------------------------

    def set_slots(self, slots: torch.Tensor | None) -> None:
        """Plan index per batch row for every site given a bank (-1 = unsteered); None clears."""
        if slots is not None:
            if not isinstance(slots, torch.Tensor) or slots.dtype not in (torch.int32, torch.int64):
                raise TypeError("slots must be an int32 or int64 tensor [batch]")
            if slots.dim() != 1:
                raise ValueError(f"slots must be [batch], got shape {tuple(slots.shape)}")
            if slots.numel():
                low, top = int(slots.min()), int(slots.max())
                if low < -1:
                    raise ValueError(f"slots holds {low}; use -1 to leave a row unsteered")
                for site in self.sites:  # every bank that will read them, before any is used
                    if site.per_row and top >= len(site.bank):
                        raise ValueError(f"slots holds {top}, out of range for the bank of {len(site.bank)} plan(s) "
                                         f"at site {site.name or site.site!r}")
        self._slots = _store(self._slots, slots)
        self._row_cache.clear()

    def set_weights(self, weights: float | torch.Tensor | Mapping[str, float | torch.Tensor] | None) -> None:
        """Multipliers of the steering: a number (every row, like repeng's coefficient), or a float
        tensor [batch] (one per row) or [1]; for every site, or a mapping {SteeringSite.name: w} for
        named sites. None clears all. Call it from an `on_step` callback to change the weights at
        every generated token."""
        items = weights.items() if isinstance(weights, Mapping) else [(None, weights)]
        names = {s.name for s in self.sites}
        for name, w in items:
            if name is not None and name not in names:
                raise ValueError(f"weights names {name!r}, which no SteeringSite carries (names: {sorted(n for n in names if n)})")
            if w is None:
                self._weights.pop(name, None)
                continue
            if isinstance(w, (int, float)) and not isinstance(w, bool):
                if w != w or w in (float("inf"), float("-inf")):
                    raise ValueError(f"weights must be finite, got {w}")
                w = torch.tensor([float(w)])  # one row, broadcast over the batch
            elif isinstance(w, torch.Tensor) and w.dim() == 0:
                w = w.reshape(1)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise TypeError("weights must be a number or a floating-point tensor [batch]")
            if w.dim() != 1:
                raise ValueError(f"weights must be a number or [batch], got shape {tuple(w.shape)}")
            self._weights[name] = _store(self._weights.get(name), w.float())
        if weights is None:
            self._weights.clear()
        self._row_cache.clear()

    def set_prompt_length(self, n: int | None) -> None:
        """Pins the prompt length for "prompt"/"generated" positions (e.g. to recompute a generation
        without the cache); None (default) takes it from each prefill (a forward on an empty cache)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"prompt length must be a non-negative int or None, got {n!r}")
        self._pinned_prompt = n

    def on_step(self, fn: Callable[[PatchHandle, Step], None]) -> Callable[[], None]:
        """Calls fn(handle, step) before every forward of the patched model (each generated token);
        fn may call set_weights / set_slots. Returns a function that removes the callback."""
        self._callbacks.append(fn)
        self._needs_step = True

        def remove() -> None:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

        return remove

    # --- runtime ---------------------------------------------------------------------------------

    def _begin_forward(self, past: int) -> None:
        prompt = self._pinned_prompt
        if prompt is None and past > 0:  # a decode step: the prefill's length, else all cached tokens
            prompt = self._seen_prompt if self._seen_prompt is not None else past
        self.step = Step(past_length=past, prompt_length=prompt)
        self._row_cache.clear()
        for fn in list(self._callbacks):
            fn(self, self.step)

    def _end_forward(self) -> None:
        if self.step.past_length == 0 and self._pinned_prompt is None:
            self._seen_prompt = self.step.prompt_length
        self.step = None  # a later call that bypasses the patched model must not see a stale step

    def _rows(self, site: SteeringSite, batch: int, seq: int, device: torch.device):
        """(gate, slot) of this call as contiguous per-row tensors [batch * seq] on `device` (None
        where every row takes 1 / plan 0), or (False, None) when no row is steered. They are the
        same for every layer of one forward, so eager calls build them once per forward and site
        (the cache is dropped by set_slots / set_weights and by every tracked forward); compiled
        and captured steps build them in the graph, which then follows the buffers."""
        key = (site, batch, seq)
        rows = self._row_cache.get(key)
        if rows is None:
            rows = self._gate(site, batch, seq, device), self._slot(site, batch, seq, device)
            if not torch.compiler.is_compiling() and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                self._row_cache[key] = rows
        return rows

    def _gate(self, site: SteeringSite, batch: int, seq: int, device) -> torch.Tensor | None | bool:
        """Per-row multiplier [batch * seq] fp32, None for "all rows fully", False for none."""
        positions = site.positions
        mask = None
        if not isinstance(positions, str) or positions != "all":
            step = self.step
            if step is None:
                raise RuntimeError("positions other than 'all' need the forward to go through the patched model itself")
            if step.prompt_length is None:  # a prefill (empty cache): its tokens are the prompt
                step.prompt_length = seq
            past, prompt = step.past_length, step.prompt_length
            if isinstance(positions, torch.Tensor):
                if positions.shape[0] not in (1, batch):
                    raise ValueError(f"positions mask has {positions.shape[0]} rows but the batch has {batch}")
                cols = site.mask_on(device)[:, past:past + seq]
                if cols.shape[1] < seq:
                    cols = torch.nn.functional.pad(cols, (0, seq - cols.shape[1]), value=False)
                mask = cols.expand(batch, seq)
            else:
                first_gen = max(0, min(seq, prompt - past))  # tokens [0, first_gen) of this call are prompt
                lo, hi = (0, first_gen) if positions == "prompt" else (first_gen, seq)
                if lo >= hi:
                    return False
                if hi - lo < seq:
                    idx = torch.arange(seq, device=device)
                    mask = ((idx >= lo) & (idx < hi)).expand(batch, seq)
        w = self._weights.get(site.name) if site.name is not None else None
        if w is None:
            w = self._weights.get(None)
        if w is not None:
            if w.shape[0] not in (1, batch):  # [1]: a number for every row
                raise ValueError(f"weights hold {w.shape[0]} rows but the batch has {batch}")
            w = w.to(device)
            if w.shape[0] != batch:  # [1]: a number for every row
                w = w.expand(batch)
            if mask is None:  # decode (one token per row): the buffer itself where it can be
                return w.contiguous() if seq == 1 else w.repeat_interleave(seq)
            return (w[:, None] * mask).reshape(-1)
        return None if mask is None else mask.reshape(-1).float()

    def _slot(self, site: SteeringSite, batch: int, seq: int, device) -> torch.Tensor | None:
        if not site.per_row:
            return None
        if self._slots is None:
            raise ValueError("a SteeringSite holds a bank of plans: call handle.set_slots(tensor [batch]) first")
        if self._slots.shape[0] != batch:
            raise ValueError(f"slots hold {self._slots.shape[0]} rows but the batch has {batch}")
        slots = self._slots.to(device)
        return slots if seq == 1 else slots.repeat_interleave(seq)

    def _steer(self, layer: int, site: SteeringSite, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Steers x [batch, seq, d] (or [seq, d]); in place only where the caller says it is safe.

        The decode hot path: the site's kernel call is prepared once per device (bank tensors, backend,
        op), the per-row tensors once per forward, so a layer costs one op call plus a few checks."""
        batch, seq = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        gate, slot = self._rows(site, batch, seq, x.device)
        if gate is False:
            return x
        if not x.is_contiguous():  # rare (a module returning a strided view): the general path
            y = steer(x, site.bank, slot=None if slot is None else slot.view(x.shape[:-1]),
                      gate=None if gate is None else gate.view(x.shape[:-1]),
                      backend=self.backend, return_monitors=site.bank.num_monitors > 0)
            return self._collect(layer, site, y)
        x2 = x.view(-1, x.shape[-1])
        in_place = in_place and not (x.requires_grad and torch.is_grad_enabled())
        out2 = x2 if in_place else None
        run = site.runner(x.device, self.backend)
        if site.bank.is_additive:
            y2 = run(x2, gate, slot, out2, in_place)
        else:
            y2, monitors = run(x2, gate, slot, out2, in_place, None)
            if site.bank.num_monitors:
                self.monitors[(layer, site.site)] = monitors.view(*x.shape[:-1], monitors.shape[-1])
        return x if in_place else y2.view(x.shape)

    def _collect(self, layer: int, site: SteeringSite, result):
        # steer returns (y, monitors) for plans with monitors; the latest forward's read-outs are
        # kept per (layer, site) for the user.
        if isinstance(result, tuple):
            result, monitors = result
            self.monitors[(layer, site.site)] = monitors
        return result


def _store(buffer: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """Copies into the existing buffer when shape and dtype match (keeps CUDA graph addresses)."""
    if value is None:
        return None
    if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype and buffer.device == value.device:
        return buffer.copy_(value)
    return value.detach().clone()


# The handle lives on the patched instance (no global registry, so a patched model can be freed).
_HANDLE_ATTR = "_actshift_patch"


# --- where the KV cache is ------------------------------------------------------------------------

# The names generate() has passed the KV cache under: `cache` from transformers 5.24 on,
# `past_key_values` before (and still accepted, deprecated). tests/test_patch_cache.py names this
# assumption: a release that renames it again fails there, and PastLength raises instead of guessing.
CACHE_NAMES = ("cache", "past_key_values")
# Other parameter names that look like a cache but hold none (flags and positions).
_NOT_CACHE = frozenset({"use_cache", "cache_position", "cache_implementation", "cache_config", "return_legacy_cache"})


def cache_keyword(model) -> str:
    """The keyword under which this transformers release's model (an instance or its class) takes
    the KV cache ("cache" from 5.24 on, "past_key_values" before), for hand-written decode loops
    that work on both."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    raise TypeError(f"{name}.forward takes none of {CACHE_NAMES}: an unknown transformers release")


class PastLength:
    """Tokens already in the KV cache of one forward call of a model, however the call passes it:
    as `cache=` or `past_key_values=`, positionally, or only as `cache_position`.

    An argument that looks like a cache (its name has "cache" or "past" in it) but is not a
    transformers Cache raises TypeError: positions would be wrong, so nothing is guessed."""

    def __init__(self, forward: Callable):
        from transformers.cache_utils import Cache  # the patch layer serves transformers models

        self._cache_type = Cache
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._positional = [(name, positional.index(name)) for name in CACHE_NAMES if name in positional]

    def __call__(self, args: tuple, kwargs: dict) -> int:
        cache = None
        for name in CACHE_NAMES:
            cache = kwargs.get(name)
            if cache is not None:
                break
        else:
            for name, i in self._positional:
                if i < len(args) and args[i] is not None:
                    cache = args[i]
                    break
            else:
                cache = self._unknown_cache(kwargs)
        if cache is not None:
            if not isinstance(cache, self._cache_type):
                raise TypeError(f"actshift.patch: the KV cache passed to the model is a {type(cache).__name__}, "
                                "not a transformers Cache; cannot tell which tokens are cached")
            return int(cache.get_seq_length())
        position = kwargs.get("cache_position")
        if isinstance(position, torch.Tensor) and position.numel():
            return int(position.reshape(-1)[0])
        return 0

    def _unknown_cache(self, kwargs: dict):
        """A cache passed under a name this module does not know: found by type, or an error."""
        for name, value in kwargs.items():
            if isinstance(value, self._cache_type):
                return value
            if value is not None and name not in _NOT_CACHE and ("cache" in name or "past" in name):
                raise TypeError(f"actshift.patch: the model was called with {name}= ({type(value).__name__}), an "
                                "argument this version of actshift does not know; it cannot tell which tokens are "
                                "cached, so positions other than 'all' and on_step cannot run")
        return None


# --- locating the sites ---------------------------------------------------------------------------


def _resolve_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    items = list(layers) if isinstance(layers, Iterable) else [layers]
    out = []
    for i in items:
        try:
            i = operator.index(i)  # ints, numpy ints, 0-d int tensors; not floats
        except TypeError:
            raise TypeError(f"layers must be ints, got {type(i).__name__}") from None
        if not -n <= i < n:
            raise ValueError(f"layer {i} is out of range for a model with {n} layers")
        out.append(i % n)
    return out


def _as_sites(steering) -> list[SteeringSite]:
    if isinstance(steering, SteeringSite):
        return [steering]
    if isinstance(steering, (SteeringPlan, SteeringBank)):
        return [SteeringSite(plan=steering)]
    if isinstance(steering, Mapping):
        sites = []
        for layer, plan in steering.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"steering mapping keys must be layer indices (int), got {layer!r}")
            sites.append(SteeringSite(plan=plan, layers=[layer]))
        return sites
    if isinstance(steering, Sequence) and not isinstance(steering, (str, bytes)):
        if all(isinstance(s, SteeringSite) for s in steering) and steering:
            return list(steering)
    raise TypeError("steering must be a SteeringPlan, a SteeringBank, a {layer: plan} mapping, a SteeringSite "
                    f"or a list of SteeringSites; got {type(steering).__name__}")


# --- features -------------------------------------------------------------------------------------


def _wrap_forward(module: torch.nn.Module, make: Callable, handle: PatchHandle) -> None:
    """Gives `module` an instance-level forward built from its current one; registers the undo."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.__dict__["forward"] = make(module.forward)

    def undo() -> None:
        if had:
            module.__dict__["forward"] = old
        else:
            module.__dict__.pop("forward", None)

    handle.add_undo(undo)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def patch_steering(model: torch.nn.Module, steering, handle: PatchHandle) -> None:
    """Installs steering wrappers (see `patch`). Validates everything before changing the model."""
    sites = _as_sites(steering)
    arch = architectures.architecture(model)
    blocks = architectures.blocks(model, arch)
    hidden = architectures.hidden_size(model)
    n = len(blocks)
    pre: dict[torch.nn.Module, list] = {}
    post: dict[torch.nn.Module, list] = {}
    for s in sites:
        if s.bank.hidden_size != hidden:
            raise ValueError(f"steering plan has hidden size {s.bank.hidden_size} but the model's hidden size is {hidden}")
        for i in _resolve_layers(s.layers, n):
            block = blocks[i]
            if s.site == "block_input":
                pre.setdefault(block, []).append((i, s))
            else:
                post.setdefault(architectures.site_module(arch, block, s.site, i), []).append((i, s))
    handle.sites.extend(sites)
    handle._needs_step = handle._needs_step or any(
        isinstance(s.positions, torch.Tensor) or s.positions != "all" for s in sites)

    for module in list(dict.fromkeys([*pre, *post])):
        _wrap_forward(module, lambda fwd, m=module: _steered_forward(fwd, pre.get(m, ()), post.get(m, ()), handle), handle)

    def begin(fwd):
        past_length = PastLength(fwd)

        @functools.wraps(fwd)  # generate() reads the forward's signature (attention_mask, logits_to_keep, ...)
        def forward(*args, **kwargs):
            if not handle._needs_step:  # positions "all" and no callbacks: nothing to track
                handle._row_cache.clear()  # keys hold the call's shape: keep one forward's
                return fwd(*args, **kwargs)
            handle._begin_forward(past_length(args, kwargs))
            out = fwd(*args, **kwargs)
            handle._end_forward()
            return out

        return forward

    _wrap_forward(model, begin, handle)


def _steered_forward(fwd, pre, post, handle: PatchHandle):
    @functools.wraps(fwd)  # keeps the signature that callers inspect
    def forward(*args, **kwargs):
        if pre:
            x = _hidden_arg(args, kwargs)
            for layer, site in pre:  # out of place: the block's input is the previous block's output
                x = handle._steer(layer, site, x, in_place=False)
            if args:
                args = (x,) + args[1:]
            else:
                kwargs["hidden_states"] = x
        out = fwd(*args, **kwargs)
        if post:
            y = _first(out)
            # In place saves a pass, unless the module handed back its own input (which its caller
            # may still use, e.g. as the residual).
            in_place = y is not _hidden_arg(args, kwargs)
            for layer, site in post:
                y = handle._steer(layer, site, y, in_place=in_place)
            out = _replace_first(out, y)
        return out

    return forward


def patch_sparsity(model: torch.nn.Module, spec, handle: PatchHandle) -> None:
    """`sparsity=`: calibrated actshift.sparse.Thresholds -> SparseLinear / CatsMLP swaps."""
    from ..sparse import patch_sparsity as swap

    swap(model, spec, handle, prefill=handle.prefill)


def patch_experts(model: torch.nn.Module, spec, handle: PatchHandle) -> None:
    """`experts=`: ExpertPlans at the MoE routers (actshift.experts.patch)."""
    from ..experts.patch import patch_experts as route

    route(model, spec, handle)


def patch_ffn(model: torch.nn.Module, spec, handle: PatchHandle) -> None:
    """`ffn=`: "relu_sparse" -> exact ReLU-sparse FFN swaps (actshift.relu_ffn)."""
    from ..sparse import patch_ffn as swap

    swap(model, spec, handle)


# Applied in this order (module swaps before steering wraps the modules); undone in reverse.
FEATURES: dict[str, Callable[[torch.nn.Module, object, PatchHandle], None]] = {
    "sparsity": patch_sparsity,
    "ffn": patch_ffn,
    "experts": patch_experts,
    "steering": patch_steering,
}


def patch(model: torch.nn.Module, *, steering=None, sparsity=None, ffn=None, experts=None, prefill: str = "dense",
          backend: str = "auto") -> PatchHandle:
    """Patches this model instance in place and returns the handle (also a context manager).

    Args:
        model: a transformers model of a type in actshift.integrations.architectures (e.g.
            LlamaForCausalLM, GPT2LMHeadModel).
        steering: a SteeringPlan or SteeringBank (every layer's block output), a {layer: plan}
            mapping, a SteeringSite, or a list of SteeringSites.
        sparsity: actshift.sparse.Thresholds from `actshift.sparse.calibrate` (TEAL sites: sparse
            linears; "cats": sparse MLPs); decode steps run the sparse kernels.
        prefill: with `sparsity`, "dense" (default) runs prefill on the original modules exactly;
            "sparse" thresholds prefill too, as TEAL's quality evaluation does.
        ffn: "relu_sparse" swaps every ReLU-family FFN for the exact skipping kernel (relu_ffn).
        experts: MoE expert steering (actshift.experts): an ExpertPlan (every MoE layer), a
            {layer: ExpertPlan} mapping, or a list of those (a bank; rows pick theirs with
            handle.set_slots, the same slots as steering banks).
        backend: the steer backend ("auto", "cpu", "triton", "cuda", "reference").

    Call the patched model itself (or its generate), so the handle sees each step's cache length.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if get_handle(model) is not None:
        raise ValueError("model is already patched; call actshift.unpatch(model) first")
    if prefill not in ("dense", "sparse"):
        raise ValueError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
    if prefill != "dense" and sparsity is None:
        raise ValueError("prefill='sparse' applies to the sparsity= swaps; pass sparsity=Thresholds too")
    _check_combination(sparsity, ffn)
    handle = PatchHandle(model, backend, prefill)
    specs = {"sparsity": sparsity, "ffn": ffn, "experts": experts, "steering": steering}
    try:
        for name, fn in FEATURES.items():
            if specs[name] is not None:
                fn(model, specs[name], handle)
    except BaseException:
        _undo_all(handle)
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


# TEAL / CATS sites inside the FFN, which ffn="relu_sparse" replaces whole.
_FFN_SITES = ("gate_up", "down", "cats")


def _check_combination(sparsity, ffn) -> None:
    """Rejects feature combinations that would swap the same module twice, before anything changes."""
    if sparsity is None or ffn is None:
        return
    clash = [s for s in getattr(sparsity, "sites", ()) if s in _FFN_SITES]
    if clash:
        raise ValueError(
            f"sparsity= thresholds cover the FFN sites {clash}, but ffn={ffn!r} replaces the whole FFN; to combine "
            "them, calibrate the attention sites only (actshift.sparse.calibrate(..., sites=('qkv', 'o'))), "
            "or pass only one of sparsity= and ffn=")


def _undo_all(handle: PatchHandle) -> None:
    while handle._undo:
        handle._undo.pop()()


def unpatch(model: torch.nn.Module) -> None:
    """Reverts `actshift.patch(model, ...)`: runs the handle's undo list newest first, so the
    model's modules (sparse swaps, FFN swaps, relufy with the handle) and instance forwards are
    the very objects they were before, and its outputs are bit-identical to the unpatched model.
    Same as `handle.unpatch()` or leaving the handle's `with` block. ValueError if `model` is not
    patched. Swaps made without a handle (`sparse.patch_sparsity(model, thr)`) are undone by
    `actshift.sparse.unpatch(model)` instead."""
    handle = model.__dict__.pop(_HANDLE_ATTR, None) if isinstance(model, torch.nn.Module) else None
    if handle is None:
        raise ValueError("model is not patched by actshift")
    _undo_all(handle)


def get_handle(model: torch.nn.Module) -> PatchHandle | None:
    """The handle of a patched model, or None."""
    return model.__dict__.get(_HANDLE_ATTR)
