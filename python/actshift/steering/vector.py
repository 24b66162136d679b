"""A steering vector as a value: {layer: direction [d]} with repeng-style arithmetic.

    v = SteeringVector.train(model, pairs, [0, 1], tokenizer=tok, aggregator="logistic")
    mix = v1 + 0.5 * v2 - v3            # layer by layer
    with mix.apply(model, multiplier=4.0):   # patches the model; leaving the block removes it
        model.generate(...)

The arithmetic is repeng's `ControlVector`'s: `a + b` holds the union of both operands' layers,
summing where both have a vector, so a layer present only in `b` contributes b's vector (negated
in `a - b`); `c * v`, `v * c`, `v / c` and `-v` act on every layer. Every layer's vector has the
same hidden size, is fp32 on CPU and is applied at `site` (default: the block output, where repeng,
steering-vectors, CAA and llama.cpp add theirs). A SteeringVector is a read-only mapping, so it
goes anywhere a {layer: tensor} dict does (`save`, `export_gguf`, `plans_from_vectors`).
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping

import torch

from .plan import SteeringPlan

SITES = ("block_output", "block_input", "attention_output", "mlp_output")  # as in the patch layer


def _as_direction(value, name: str, d: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1:
        raise TypeError(f"{name} must be a floating-point tensor [d]")
    if d is not None and value.shape[0] != d:
        raise ValueError(f"{name} has hidden size {value.shape[0]}, but the other layers have {d}")
    if value.shape[0] == 0 or not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be non-empty and finite")
    # A private copy: later changes to the caller's tensor must not change this value.
    return value.detach().to("cpu", torch.float32, copy=True).contiguous()


def _scalar(value) -> float | None:
    """A finite real number as a float; None for non-numbers (so Python can try the other operand)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if not math.isfinite(value):
        raise ValueError(f"the coefficient must be finite, got {value}")
    return float(value)


class SteeringVector(Mapping):
    """Per-layer steering directions with arithmetic (see the module docstring).

    Args:
        directions: {layer: tensor [d]}, 0-based decoder layers (non-negative, so that the union of
            two vectors' layers is unambiguous).
        model_type: the model it belongs to (e.g. "llama"); recorded in GGUF files as model_hint and
            checked when two vectors are combined.
        site: where `apply` adds it: "block_output", "block_input", "attention_output" or "mlp_output".
    """

    __hash__ = None  # mutable-looking values with tensor contents: compare with ==, do not hash

    def __init__(self, directions: Mapping[int, torch.Tensor], *, model_type: str | None = None,
                 site: str = "block_output"):
        if not isinstance(directions, Mapping) or not directions:
            raise ValueError("directions must be a non-empty {layer: tensor [d]} mapping")
        if site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}; got {site!r}")
        if model_type is not None and not isinstance(model_type, str):
            raise TypeError(f"model_type must be a str or None, got {type(model_type).__name__}")
        d = None
        data = {}
        for layer in sorted(directions):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"directions: layer keys must be non-negative ints, got {layer!r}")
            data[layer] = _as_direction(directions[layer], f"directions[{layer}]", d)
            d = data[layer].shape[0]
        self._data = data
        self.model_type = model_type
        self.site = site

    # --- mapping -----------------------------------------------------------------------------------

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._data[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def layers(self) -> list[int]:
        return list(self._data)

    @property
    def hidden_size(self) -> int:
        return next(iter(self._data.values())).shape[0]

    def norms(self) -> dict[int, float]:
        """{layer: L2 norm of its vector}."""
        return {layer: float(v.norm()) for layer, v in self._data.items()}

    def __repr__(self) -> str:
        norms = ", ".join(f"{layer}: {n:.4g}" for layer, n in self.norms().items())
        return (f"SteeringVector(layers={self.layers}, hidden_size={self.hidden_size}, site={self.site!r}, "
                f"model_type={self.model_type!r}, norms={{{norms}}})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        same = (self.site, self.model_type, self.layers) == (other.site, other.model_type, other.layers)
        return (same and all(torch.equal(self[layer], other[layer]) for layer in self.layers))

    # --- arithmetic --------------------------------------------------------------------------------

    def _like(self, data: dict[int, torch.Tensor], model_type: str | None = None) -> SteeringVector:
        return SteeringVector(data, model_type=model_type or self.model_type, site=self.site)

    def _combine(self, other, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.site != self.site:
            raise ValueError(f"cannot combine vectors for different sites ({self.site!r} and {other.site!r})")
        if other.hidden_size != self.hidden_size:
            raise ValueError(
                f"cannot combine vectors of hidden sizes {self.hidden_size} and {other.hidden_size}")
        if self.model_type and other.model_type and self.model_type != other.model_type:
            raise ValueError(
                f"cannot combine vectors of different models ({self.model_type!r} and {other.model_type!r})")
        data = dict(self._data)
        for layer, v in other.items():
            data[layer] = data[layer] + sign * v if layer in data else sign * v
        return self._like(data, self.model_type or other.model_type)

    def __add__(self, other) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other) -> SteeringVector:
        return self._combine(other, -1.0)

    def __neg__(self) -> SteeringVector:
        return self._like({layer: -v for layer, v in self._data.items()})

    def __pos__(self) -> SteeringVector:
        return self

    def __mul__(self, other) -> SteeringVector:
        c = _scalar(other)
        if c is None:
            return NotImplemented
        return self._like({layer: c * v for layer, v in self._data.items()})

    __rmul__ = __mul__

    def __truediv__(self, other) -> SteeringVector:
        c = _scalar(other)
        if c is None:
            return NotImplemented
        if c == 0.0:
            raise ZeroDivisionError("cannot divide a SteeringVector by zero")
        return self._like({layer: v / c for layer, v in self._data.items()})

    # --- use ---------------------------------------------------------------------------------------

    def plans(self, strength: float = 1.0) -> dict[int, SteeringPlan]:
        """{layer: SteeringPlan(add=vector, strength)}."""
        return {layer: SteeringPlan(add=v, strength=strength) for layer, v in self._data.items()}

    def sites(self, strength: float = 1.0, *, positions="all", name: str | None = None) -> list:
        """SteeringSites for `actshift.patch(model, steering=...)`: each layer's plan at `self.site`,
        on `positions` ("all", "prompt", "generated" or a bool mask), weighted by `name` if given."""
        from ..integrations.transformers import SteeringSite

        return [SteeringSite(plan=plan, layers=[layer], site=self.site, positions=positions, name=name)
                for layer, plan in self.plans(strength).items()]

    def apply(self, model, multiplier: float = 1.0, *, positions="all", backend: str = "auto"):
        """Adds multiplier·vector at every layer of `model` (patched in place) and returns the patch
        handle: use it as a context manager, or call `handle.unpatch()` to remove the steering."""
        from ..integrations.transformers import patch
        from .extract import decoder_layers, hidden_size

        if hidden_size(model) != self.hidden_size:
            raise ValueError(f"model has hidden size {hidden_size(model)}, the vector {self.hidden_size}")
        n = len(decoder_layers(model))
        if self.layers[-1] >= n:
            beyond = [i for i in self.layers if i >= n]
            raise ValueError(f"model has {n} layers; the vector holds layer(s) {beyond}")
        return patch(model, steering=self.sites(multiplier, positions=positions), backend=backend)

    # --- making and storing ------------------------------------------------------------------------

    @classmethod
    def train(cls, model, pairs, layers, *, tokenizer=None, aggregator: str | Callable = "mean",
              pooling: str = "last", batch_size: int = 8, progress: bool = False) -> SteeringVector:
        """Reads contrastive activations at each layer's block output and aggregates each pair set
        into one vector (see `actshift.steering.aggregate`: "mean", "pca", "logistic" or a callable
        (positive [n, d], negative [n, d]) -> [d])."""
        from .aggregators import aggregate
        from .recipes import _contrastive

        pos, neg = _contrastive(model, pairs, layers, tokenizer, pooling, batch_size, progress)
        config = getattr(model, "config", None)
        return cls({layer: aggregate(pos[layer], neg[layer], aggregator) for layer in pos},
                   model_type=getattr(config, "model_type", None))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, *, model=None) -> SteeringVector:
        """A llama.cpp / repeng control-vector file (`import_gguf`); model_type from its model_hint."""
        from .formats import GGUF_ARCH, import_gguf

        vectors, meta = import_gguf(path, model=model)
        hint = meta.get(f"{GGUF_ARCH}.model_hint")
        return cls(vectors, model_type=hint if isinstance(hint, str) and hint else None)

    def to_gguf(self, path: str | os.PathLike, *, model=None, model_hint: str | None = None) -> None:
        """Writes a llama.cpp control-vector file (`export_gguf`; block-output vectors only)."""
        from .formats import export_gguf

        if self.site != "block_output":
            raise ValueError(
                f"llama.cpp control vectors act on block outputs; this vector's site is {self.site!r}")
        export_gguf(path, self._data, model=model, model_hint=model_hint or self.model_type)
