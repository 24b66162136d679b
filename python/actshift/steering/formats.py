"""Steering files: safetensors with metadata for vectors and plans, and llama.cpp GGUF control vectors.

Layer numbering. Our layer i is the i-th decoder block of the transformers model (0-based), and a
vector for it acts on that block's output (site "block_output"). llama.cpp names its tensors
"direction.<il>" and adds direction.<il> to the output of its 0-based block il
(`llama_adapter_cvec::apply_to(ctx, cur, il)` at the end of each layer); it rejects il = 0 and
stores layer il at offset (il - 1)·n_embd, so block 0 can never be steered there. The mapping is
therefore the identity, i ↔ direction.i, and exporting a vector for layer 0 is an error. This is
also repeng's convention (its layer i is model.layers[i]'s output).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from .._optional import require
from .plan import SteeringPlan

FORMAT_KEY = "actshift.format"  # "vectors" or "plans"
GGUF_ARCH = "controlvector"


def _version() -> str:
    from .. import __version__

    return __version__


def _model_meta(model) -> dict[str, str]:
    if model is None:
        return {}
    from .extract import decoder_layers, hidden_size

    config = getattr(model, "config", None)
    return {"model_type": str(getattr(config, "model_type", type(model).__name__)),
            "hidden_size": str(hidden_size(model)), "num_layers": str(len(decoder_layers(model)))}


def _check_layer_keys(data: Mapping, name: str) -> list[int]:
    if not data:
        raise ValueError(f"{name} must hold at least one layer")
    for layer in data:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{name}: layer keys must be non-negative ints, got {layer!r}")
    return sorted(data)


def _as_vector(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if value.dim() not in (1, 2) or value.shape[-1] == 0:
        raise ValueError(f"{name} must be [d] or [m, d], got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value.detach().to("cpu", torch.float32).contiguous()


def _layer_index(text: str) -> int | None:
    """A layer index written as save/export write it (ASCII digits, no sign, no leading zero), else
    None: "01" would alias "1", and str.isdigit() also accepts "٣" and "²"."""
    return int(text) if re.fullmatch(r"0|[1-9][0-9]*", text) else None


def _file_vectors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str) -> dict[int, torch.Tensor]:
    """The {layer: tensor} of a "vectors" file, validated as `save` writes it."""
    if not tensors:
        raise ValueError(f"{where}: the file holds no vectors")
    data = {}
    for key, t in tensors.items():
        prefix, dot, index = key.partition(".")
        layer = _layer_index(index) if prefix == "layer" and dot else None
        if layer is None:
            raise ValueError(f"{where}: tensor {key!r} is not named layer.<n> (n a non-negative integer, no leading zeros)")
        if t.dtype != torch.float32:
            raise ValueError(f"{where}: tensor {key} is {t.dtype}; steering files hold float32 vectors")
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"{where}: tensor {key} must be a non-empty [d] or [m, d], got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {key} contains NaN or Inf")
        data[layer] = t.contiguous()
    sizes = sorted({t.shape[-1] for t in data.values()})
    if len(sizes) != 1:
        raise ValueError(f"{where}: the vectors have different hidden sizes {sizes}")
    if "hidden_size" in meta and meta["hidden_size"] != str(sizes[0]):
        raise ValueError(f"{where}: metadata says hidden_size {meta['hidden_size']!r} but the vectors have {sizes[0]}")
    if "layers" in meta:
        try:
            listed = json.loads(meta["layers"])
        except ValueError:
            listed = None
        if listed != sorted(data):
            raise ValueError(f"{where}: metadata lists layers {meta['layers']} but the file holds {sorted(data)}")
    return dict(sorted(data.items()))


def _plan_fields(plan: SteeringPlan, prefix: str, tensors: dict) -> dict:
    """The plan's public state: tensors go to `tensors` under `prefix.<name>`, the rest to JSON."""
    fields = {}
    for name, value in vars(plan).items():
        if name.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            key = f"{prefix}.{name}"
            t = value.detach().cpu()
            tensors[key] = (t.float() if t.is_floating_point() else t).contiguous()
            fields[name] = {"tensor": key}
        elif value is None or isinstance(value, (bool, int, float, str)):
            fields[name] = {"value": value}
        else:
            raise TypeError(f"plan attribute {name} of type {type(value).__name__} cannot be saved")
    return fields


def save(path: str | os.PathLike, data, *, model=None, method: str | None = None,
         metadata: Mapping[str, str] | None = None) -> None:
    """Writes per-layer vectors or plans to a safetensors file with metadata.

    Args:
        path: the file to write.
        data: {layer: tensor [d] or [m, d]} (raw vectors), {layer: SteeringPlan}, or one SteeringPlan.
        model: the transformers model they belong to; records model_type, hidden_size, num_layers.
        method: how they were made ("caa", "pca", "actadd", ...), recorded as-is.
        metadata: extra string key/values.

    Metadata always holds actshift.format, actshift.version, hidden_size and layers (JSON list).
    """
    save_file = require("safetensors.torch", "actshift.steering.save").save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(_model_meta(model))
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(data, SteeringPlan):
        meta[FORMAT_KEY] = "plan"
        meta["plan_fields"] = json.dumps(_plan_fields(data, "plan", tensors))
        layers: list[int] = []
        d = data.hidden_size
    elif isinstance(data, Mapping):
        layers = _check_layer_keys(data, "data")
        if all(isinstance(v, SteeringPlan) for v in data.values()):
            meta[FORMAT_KEY] = "plans"
            meta["plan_fields"] = json.dumps({str(layer): _plan_fields(data[layer], f"plan.{layer}", tensors)
                                              for layer in layers})
            sizes = {data[layer].hidden_size for layer in layers}
        else:
            meta[FORMAT_KEY] = "vectors"
            for layer in layers:
                tensors[f"layer.{layer}"] = _as_vector(data[layer], f"data[{layer}]")
            sizes = {t.shape[-1] for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"data: every layer must have the same hidden size, got {sorted(sizes)}")
        d = sizes.pop()
    else:
        raise TypeError(f"data must be a SteeringPlan or a dict {{layer: tensor | SteeringPlan}}, got {type(data).__name__}")
    if d is None:
        raise ValueError("data: a plan without a vector part has no hidden size to record")
    if "hidden_size" in meta and int(meta["hidden_size"]) != d:
        raise ValueError(f"data has hidden size {d} but the model has {meta['hidden_size']}")
    meta.update({"actshift.version": _version(), "hidden_size": str(d), "layers": json.dumps(layers)})
    if method is not None:
        meta["method"] = str(method)
    save_file(tensors, os.fspath(path), metadata=meta)


def _build_plan(fields: dict, tensors: Mapping[str, torch.Tensor]) -> SteeringPlan:
    """Rebuilds a plan through its public constructor and builders, so loading validates it again."""
    st = {name: tensors[spec["tensor"]] if "tensor" in spec else spec["value"] for name, spec in fields.items()}
    plan = SteeringPlan(add=st.get("vectors"), weights=st.get("weights"), strength=st["strength"],
                        renorm=st.get("renorm", False))
    if st.get("directions") is not None:
        plan = plan.ablate(st["directions"], st["targets"])
    if st.get("scale") is not None:
        plan = plan.affine(st["scale"], st["bias"])
    if st.get("neuron_idx") is not None:
        plan = plan.neurons(st["neuron_idx"], st["neuron_mul"], st["neuron_add"])
    if st.get("condition_vector") is not None:
        plan = plan.condition(st["condition_vector"], st["condition_threshold"], st["condition_kind"],
                              st["condition_compare"])
    if st.get("monitors") is not None:
        plan = plan.monitor(st["monitors"])
    return plan


def _file_plans(kind: str, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str):
    """The plan(s) of a "plans" / "plan" file, rebuilt through the builders (which validate them);
    a malformed description is a ValueError naming the file and the layer."""
    try:
        fields = json.loads(meta["plan_fields"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: plan_fields metadata is missing or not JSON ({e})") from None
    if kind == "plan":
        fields = {None: fields}
    if not isinstance(fields, dict) or not fields:
        raise ValueError(f"{where}: plan_fields must describe at least one plan")
    data = {}
    for key, spec in fields.items():
        layer = key if kind == "plan" else _layer_index(key)
        if kind == "plans" and layer is None:
            raise ValueError(f"{where}: plan key {key!r} is not a layer index (non-negative, no leading zeros)")
        try:
            data[layer] = _build_plan(spec, tensors)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: plan {key!r} is malformed ({type(e).__name__}: {e})") from None
    return data[None] if kind == "plan" else dict(sorted(data.items()))


def load(path: str | os.PathLike, *, model=None):
    """Reads a file written by `save`: returns (data, metadata).

    `data` has the shape that was saved: {layer: tensor} (fp32, CPU), {layer: SteeringPlan} or one
    SteeringPlan. With `model`, the file's hidden size and layers are checked against it.
    """
    safe_open = require("safetensors", "actshift.steering.load").safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    kind = meta.get(FORMAT_KEY)
    where = f"path {os.fspath(path)}"
    if kind == "vectors":
        data = _file_vectors(tensors, meta, where)
    elif kind in ("plans", "plan"):
        data = _file_plans(kind, meta, tensors, where)
    else:
        raise ValueError(f"path: {os.fspath(path)} is not an actshift steering file (no {FORMAT_KEY} metadata)")
    if model is not None:
        d = next(iter(data.values())).shape[-1] if kind == "vectors" else int(meta["hidden_size"])
        _check_against_model(model, d, data if isinstance(data, dict) else {})
    return data, meta


def _check_against_model(model, d: int, data: Mapping[int, object]) -> None:
    from .extract import decoder_layers, hidden_size

    if hidden_size(model) != d:
        raise ValueError(f"model has hidden size {hidden_size(model)} but the vectors have {d}")
    n = len(decoder_layers(model))
    bad = [layer for layer in data if layer >= n]
    if bad:
        raise ValueError(f"model has {n} layers; the file holds layer(s) {bad}")


def export_gguf(path: str | os.PathLike, vectors: Mapping[int, torch.Tensor], *, model=None,
                model_hint: str | None = None) -> None:
    """Writes llama.cpp control vectors: {layer: tensor [d]} -> GGUF "direction.<layer>" (fp32).

    The file has general.architecture = "controlvector", controlvector.model_hint (the model type,
    e.g. "llama": from `model` or `model_hint`) and controlvector.layer_count (the number of
    vectors), as repeng writes them. Layers use our 0-based block indices, which are llama.cpp's
    (see the module docstring); layer 0 cannot be expressed there and raises ValueError. Scale the
    vectors first if they should carry a strength (llama.cpp's --control-vector-scaled also can).
    """
    if isinstance(vectors, SteeringPlan) or (isinstance(vectors, Mapping)
                                             and any(isinstance(v, SteeringPlan) for v in vectors.values())):
        raise TypeError("vectors: export_gguf writes raw control vectors, {layer: tensor [d]}, not SteeringPlans "
                        "(llama.cpp adds each vector as is): pass e.g. {l: 4.0 * v for l, v in caa.items()}, "
                        "or {l: p.strength * (p.weights @ p.vectors) for l, p in plans.items()} for additive plans")
    gguf = require("gguf", "actshift.steering.export_gguf")
    layers = _check_layer_keys(vectors, "vectors")
    if layers[0] == 0:
        raise ValueError("vectors: llama.cpp control vectors cannot steer layer 0 (direction.0 is rejected)")
    arrays = {}
    for layer in layers:
        v = _as_vector(vectors[layer], f"vectors[{layer}]")
        if v.dim() != 1:
            raise ValueError(f"vectors[{layer}] must be one vector [d], got shape {tuple(v.shape)}")
        arrays[layer] = v.numpy()
    sizes = {a.shape[0] for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"vectors: every layer must have the same hidden size, got {sorted(sizes)}")
    if model is not None:
        _check_against_model(model, sizes.pop(), vectors)
        model_hint = model_hint or str(getattr(model.config, "model_type", ""))
    if not model_hint:
        raise ValueError("model_hint is required (or pass model): llama.cpp records the model type")
    writer = gguf.GGUFWriter(os.fspath(path), GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(arrays))
    for layer, a in arrays.items():
        writer.add_tensor(f"direction.{layer}", a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_gguf_layout(reader, file_size: int) -> None:
    """llama.cpp's rule for the data section: each tensor starts where the previous one's aligned
    bytes end, and all of them lie inside the file. A dim declared larger than the data then cannot
    read into the next tensor or past the end (within a tensor's own alignment padding no file
    format can tell)."""
    expected = 0
    for t in reader.tensors:
        if t.data_offset - reader.data_offset != expected:
            raise ValueError(f"path: tensor {t.name} starts at byte {t.data_offset - reader.data_offset} of the data, "
                             f"expected {expected}: its declared shape {tuple(int(n) for n in t.shape)} does not match the data")
        if t.data_offset + t.n_bytes > file_size:
            raise ValueError(f"path: tensor {t.name}'s declared shape {tuple(int(n) for n in t.shape)} runs past the end of the file")
        expected += -(-t.n_bytes // reader.alignment) * reader.alignment


def import_gguf(path: str | os.PathLike, *, model=None) -> tuple[dict[int, torch.Tensor], dict]:
    """Reads a llama.cpp / repeng control-vector GGUF: returns ({layer: tensor [d] fp32}, metadata).

    Checks what llama.cpp's loader checks (tensor names direction.<il> with il >= 1, 1-D, one
    hidden size) and, with `model`, the hidden size and layer range. Besides fp32, fp16 and fp64
    tensors are read (as fp32): repeng writes its numpy arrays as they are, and arithmetic with
    numpy float64 scalars makes them fp64 (llama.cpp itself only loads fp32; `export_gguf` writes
    fp32).
    """
    gguf = require("gguf", "actshift.steering.import_gguf")

    kinds = gguf.GGMLQuantizationType
    floats = (kinds.F32, kinds.F16, kinds.F64)  # repeng writes its numpy arrays as they are (fp64 too)
    try:  # a corrupt header (counts, lengths, offsets) surfaces as any of these inside gguf/numpy
        reader = gguf.GGUFReader(os.fspath(path))
        meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {os.fspath(path)} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    if meta.get("general.architecture") != GGUF_ARCH:
        raise ValueError(f"path: general.architecture is {meta.get('general.architecture')!r}, not {GGUF_ARCH!r}")
    _check_gguf_layout(reader, os.path.getsize(path))
    vectors: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        prefix, dot, index = t.name.partition(".")
        layer = _layer_index(index) if prefix == "direction" and dot else None
        if not layer:  # None, or 0 (llama.cpp rejects direction.0)
            raise ValueError(f"path: tensor {t.name!r} is not direction.<layer> with layer >= 1 (no leading zeros)")
        if t.tensor_type not in floats or len(t.shape) != 1:
            raise ValueError(f"path: tensor {t.name} must be 1-D fp32 (or fp16/fp64)")
        if t.n_elements == 0:
            raise ValueError(f"path: tensor {t.name} is empty")
        if layer in vectors:
            raise ValueError(f"path: layer {layer} appears twice")
        vectors[layer] = torch.from_numpy(t.data.copy()).float()
    sizes = {v.shape[0] for v in vectors.values()}
    if len(sizes) > 1:
        raise ValueError(f"path: direction tensors have different sizes {sorted(sizes)}")
    if not vectors:
        raise ValueError("path: no direction tensors found")
    if not all(bool(torch.isfinite(v).all()) for v in vectors.values()):
        raise ValueError("path: direction tensors contain NaN or Inf")
    if model is not None:
        _check_against_model(model, sizes.pop(), vectors)
    return dict(sorted(vectors.items())), meta
