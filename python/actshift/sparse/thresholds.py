"""`Thresholds`: one magnitude threshold per (layer, site), with save/load."""
from __future__ import annotations

import math
import numbers
import pickle
import re
from collections.abc import Mapping

import torch

from . import sites as _sites

FORMAT = "actshift.sparse.Thresholds/1"


def check_threshold(value, name: str) -> float:
    """A finite number >= 0 as a float; ValueError/TypeError naming `name` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def _fraction(value, name: str, *, top_open: bool) -> float:
    """A number in [0, 1) (top_open) or [0, 1]; NaN, strings and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < 1.0 if top_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1{')' if top_open else ']'}, got {value!r}")
    return float(value)


class Thresholds:
    """Magnitude thresholds t per (layer index, site): an input element x is zeroed iff |x| <= t.

    `mode` is "teal" (sites among qkv/o/gate_up/down: the inputs of the linears) or "cats" (site
    "cats": |act(gate)| inside a gated MLP). `sparsity` holds the fraction of calibration
    activations at or below each threshold (what the calibration aimed for), `target` the requested
    model-wide sparsity, `meta` free-form strings (model type, method, ...) saved with them.
    """

    def __init__(self, values: Mapping, *, target: float | None = None, sparsity: Mapping | None = None,
                 meta: Mapping[str, str] | None = None):
        if not isinstance(values, Mapping) or not values:
            raise ValueError("values must be a non-empty mapping {(layer, site): threshold}")
        self.values: dict[tuple[int, str], float] = {}
        for key, v in values.items():
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and key[0] >= 0
                    and key[1] in (*_sites.TEAL_SITES, _sites.CATS_SITE)):
                raise ValueError(f"values: key {key!r} is not (layer index >= 0, site name)")
            self.values[key] = check_threshold(v, f"values[{key!r}]")
        site_names = {s for _, s in self.values}
        if _sites.CATS_SITE in site_names and len(site_names) > 1:
            raise ValueError("values: the 'cats' site cannot be mixed with TEAL sites")
        self.mode = "cats" if _sites.CATS_SITE in site_names else "teal"
        self.target = None if target is None else _fraction(target, "target", top_open=True)
        self.sparsity = {}
        for key, v in (sparsity or {}).items():
            if key not in self.values:
                raise ValueError(f"sparsity: key {key!r} has no threshold in values")
            self.sparsity[key] = _fraction(v, f"sparsity[{key!r}]", top_open=False)
        self.meta = {str(k): str(v) for k, v in (meta or {}).items()}

    @classmethod
    def constant(cls, model, value: float, sites=_sites.TEAL_SITES) -> Thresholds:
        """The same threshold at every layer and site of `model` (0 keeps every nonzero input)."""
        names = _sites.check_sites(sites, _sites.family(model))
        value = check_threshold(value, "value")
        n = len(_sites.layers(model))
        return cls({(i, s): value for i in range(n) for s in names}, meta={"model_type": model.config.model_type})

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names, in TEAL order."""
        names = {s for _, s in self.values}
        return tuple(s for s in (*_sites.TEAL_SITES, _sites.CATS_SITE) if s in names)

    @property
    def num_layers(self) -> int:
        return 1 + max(i for i, _ in self.values)

    def __getitem__(self, key: tuple[int, str]) -> float:
        return self.values[key]

    def get(self, layer: int, site: str) -> float | None:
        """The threshold of (layer, site), None where none was set (the site stays dense)."""
        return self.values.get((layer, site))

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        tgt = "" if self.target is None else f", target={self.target:g}"
        return f"Thresholds(mode={self.mode}, layers={self.num_layers}, sites={self.sites}{tgt})"

    def save(self, path) -> None:
        """Writes a torch.save file of plain Python values (loadable with weights_only=True)."""
        torch.save({
            "format": FORMAT,
            "values": {f"{i}.{s}": v for (i, s), v in self.values.items()},
            "sparsity": {f"{i}.{s}": v for (i, s), v in self.sparsity.items()},
            "target": self.target,
            "meta": self.meta,
        }, path)

    @classmethod
    def load(cls, path) -> Thresholds:
        """Reads a file written by `save`."""
        try:
            data = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"path: {path!r} is not a readable torch file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"path: {path!r} is not an actshift thresholds file ({FORMAT})")
        missing = [f for f in ("values", "sparsity", "target", "meta") if f not in data]
        if missing:
            raise ValueError(f"path: {path!r} lacks the field(s) {missing}")

        def keyed(field):
            d = data[field]
            if not isinstance(d, dict):
                raise ValueError(f"path: {field} must be a dict, got {type(d).__name__}")
            out = {}
            for k, v in d.items():
                # "<layer>.<site>", the layer as save writes it ("01" would alias "1")
                m = re.fullmatch(r"(0|[1-9][0-9]*)\.(.+)", k) if isinstance(k, str) else None
                if m is None:
                    raise ValueError(f"path: {field} key {k!r} is not '<layer>.<site>'")
                out[(int(m[1]), m[2])] = v
            return out

        meta = data["meta"]
        if not isinstance(meta, dict) or not all(isinstance(v, str) for kv in meta.items() for v in kv):
            raise ValueError("path: meta must be a dict of strings")
        try:
            return cls(keyed("values"), target=data["target"], sparsity=keyed("sparsity"), meta=meta)
        except TypeError as e:  # a wrong type inside the file is a bad file
            raise ValueError(f"path: {e}") from None

    def check_model(self, layers: list, arch) -> None:
        """ValueError naming `thresholds` when they do not fit the model's layers/sites."""
        if self.num_layers > len(layers):
            raise ValueError(f"thresholds: set for {self.num_layers} layers, the model has {len(layers)}")
        if self.mode == "cats" and arch.ffn != "gated":
            raise ValueError(f"thresholds: CATS thresholds need a gated MLP (Llama/Mistral/Qwen), not a {arch.name} model")
