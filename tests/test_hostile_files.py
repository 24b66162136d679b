"""Hostile files: every loader validates what it reads and raises a ValueError naming the problem
(issue 14, items 12-14). Each test builds the malformed file itself."""
import json
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from safetensors.torch import save_file  # noqa: E402

from actshift import sparse  # noqa: E402
from actshift.steering.formats import FORMAT_KEY, export_gguf, import_gguf, load  # noqa: E402


# --- steering.load, "vectors" format ---------------------------------------------------------------

def _vectors_file(path, tensors, **meta):
    save_file(tensors, str(path), metadata={FORMAT_KEY: "vectors", **meta})
    return path


def test_load_accepts_a_minimal_valid_file(tmp_path):
    v = torch.randn(2, 8)
    data, _ = load(_vectors_file(tmp_path / "ok.safetensors", {"layer.0": v, "layer.12": torch.randn(8)},
                                 hidden_size="8", layers="[0, 12]"))
    assert list(data) == [0, 12] and torch.equal(data[0], v)


@pytest.mark.parametrize("tensors, meta, match", [
    ({"layer.0": torch.tensor([1.0, float("nan")])}, {}, "NaN"),
    ({"layer.0": torch.tensor([1.0, float("inf")])}, {}, "NaN or Inf"),
    ({"layer.0": torch.arange(4, dtype=torch.int32)}, {}, "int32"),
    ({"layer.0": torch.randn(4).half()}, {}, "float16"),
    ({"layer.0": torch.randn(2, 2, 4)}, {}, r"shape \(2, 2, 4\)"),
    ({"layer.0": torch.zeros(0)}, {}, "non-empty"),
    ({"layer.0": torch.zeros(0, 4)}, {}, "non-empty"),
    ({"layer.0": torch.zeros(3, 0)}, {}, "non-empty"),
    ({"layer.-1": torch.randn(4)}, {}, "layer.-1"),
    ({"layer.0": torch.randn(4), "layer.1": torch.randn(5)}, {}, r"different hidden sizes \[4, 5\]"),
    ({"layer.0": torch.randn(4)}, {"hidden_size": "8"}, "hidden_size '8'"),
    ({"layer.0": torch.randn(4)}, {"hidden_size": "04"}, "hidden_size '04'"),
    ({"layer.1": torch.randn(4), "layer.01": torch.randn(4)}, {}, "layer.01"),
    ({"layer": torch.randn(4)}, {}, "'layer'"),
    ({"vec.3": torch.randn(4)}, {}, "vec.3"),
    ({"layer.\u0663": torch.randn(4)}, {}, "layer"),
    ({"layer.0": torch.randn(4)}, {"layers": "[0, 1]"}, "lists layers"),
    ({"layer.0": torch.randn(4)}, {"layers": "not json"}, "lists layers"),
    ({}, {}, "no vectors"),
], ids=["nan", "inf", "int", "fp16", "3d", "empty", "empty-rows", "empty-dim", "negative", "mixed", "hidden-size",
        "hidden-size-form", "leading-zero", "no-dot", "other-name", "unicode-digit", "layers-meta", "layers-json",
        "no-tensors"])
def test_load_rejects_hostile_vectors(tmp_path, tensors, meta, match):
    path = _vectors_file(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(ValueError, match=match):
        load(path)


def _plans_file(tmp_path, fields, kind="plans"):
    path = tmp_path / "p.safetensors"
    save_file({"t": torch.ones(4)}, str(path), metadata={FORMAT_KEY: kind, "plan_fields": fields})
    return path


_PLAN = {"vectors": {"tensor": "t"}, "strength": {"value": 2.0}}


@pytest.mark.parametrize("fields, kind, match", [
    (json.dumps({"1": _PLAN, "01": _PLAN}), "plans", "'01'"),
    (json.dumps({"\u0663": _PLAN}), "plans", "plan key"),
    (json.dumps({"-1": _PLAN}), "plans", "'-1'"),
    ("{not json", "plans", "not JSON"),
    (json.dumps({}), "plans", "at least one plan"),
    (json.dumps({"1": {"vectors": {"tensor": "t"}}}), "plans", "malformed"),
    (json.dumps({"1": {"vectors": {"tensor": "missing"}, "strength": {"value": 1.0}}}), "plans", "malformed"),
    (json.dumps({"1": {"vectors": {"tensor": "t"}, "strength": {"value": "2"}}}), "plans", "malformed"),
    (json.dumps({"vectors": {"tensor": "t"}, "strength": {"value": float("nan")}}), "plan", "finite"),
])
def test_load_rejects_hostile_plans(tmp_path, fields, kind, match):
    with pytest.raises(ValueError, match=match):
        load(_plans_file(tmp_path, fields, kind))


def test_load_plans_valid(tmp_path):
    data, _ = load(_plans_file(tmp_path, json.dumps({"3": _PLAN, "0": _PLAN})))
    assert list(data) == [0, 3] and data[3].strength == 2.0


# --- import_gguf -------------------------------------------------------------------------------------

def _gguf(path, tensors, layer_count=None):
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("names, match", [
    (["direction.1", "direction.01"], "direction.01"),
    (["direction.\u0663"], "direction.\u0663"),  # Arabic-Indic three: str.isdigit() says yes
    (["direction.\u00b2"], "direction.\u00b2"),  # superscript two: isdigit() yes, int() no
    (["direction.+2"], r"direction.\+2"),
    (["direction"], "'direction'"),
    (["direction.0"], "direction.0"),
])
def test_gguf_rejects_bad_names(tmp_path, names, match):
    path = _gguf(tmp_path / "n.gguf", {n: np.ones(8, dtype=np.float32) for n in names})
    with pytest.raises(ValueError, match=match):
        import_gguf(path)


def test_gguf_rejects_zero_length_vectors(tmp_path):
    path = _gguf(tmp_path / "z.gguf", {"direction.1": np.ones(4, dtype=np.float32),
                                        "direction.2": np.ones(4, dtype=np.float32)})
    raw = bytearray(path.read_bytes())
    dims = b"direction.2" + struct.pack("<I", 1) + struct.pack("<Q", 4)
    at = raw.index(dims) + len(dims) - 8
    raw[at:at + 8] = struct.pack("<Q", 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="direction.2 is empty|different sizes"):
        import_gguf(path)
    path = _gguf(tmp_path / "z1.gguf", {"direction.1": np.ones(4, dtype=np.float32)})
    raw = bytearray(path.read_bytes())
    dims = b"direction.1" + struct.pack("<I", 1) + struct.pack("<Q", 4)
    at = raw.index(dims) + len(dims) - 8
    raw[at:at + 8] = struct.pack("<Q", 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="direction.1 is empty"):
        import_gguf(path)


def _patched(path, offset: int, value: int):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("field_offset, value", [
    (8, 1000),  # tensor count (header: magic, version, n_tensors, n_kv)
    (8, 2**63),
    (16, 40),  # key/value count
    (16, 0),
], ids=["tensors-1000", "tensors-huge", "kv-40", "kv-0"])
def test_gguf_rejects_corrupt_counts(tmp_path, field_offset, value):
    path = _gguf(tmp_path / "c.gguf", {"direction.1": np.ones(8, dtype=np.float32),
                                        "direction.2": np.ones(8, dtype=np.float32)})
    _patched(path, field_offset, value)
    with pytest.raises(ValueError, match="c.gguf|architecture|direction"):
        import_gguf(path)


def test_gguf_rejects_truncated_data(tmp_path):
    path = _gguf(tmp_path / "t.gguf", {"direction.1": np.ones(8, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="t.gguf|end of the file"):
        import_gguf(path)


def test_gguf_rejects_a_dim_larger_than_the_data(tmp_path):
    """8 floats fill one 32-byte alignment slot exactly; declaring 16 would read the next vector."""
    path = _gguf(tmp_path / "d.gguf", {"direction.1": np.ones(8, dtype=np.float32),
                                        "direction.2": np.full(8, 2.0, dtype=np.float32)})
    raw = bytearray(path.read_bytes())
    for name in (b"direction.1", b"direction.2"):
        dims = name + struct.pack("<I", 1) + struct.pack("<Q", 8)
        at = raw.index(dims) + len(dims) - 8
        raw[at:at + 8] = struct.pack("<Q", 16)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="d.gguf"):  # direction.2 would run past the end
        import_gguf(path)
    path.write_bytes(bytes(raw) + bytes(32))  # trailing bytes: every read stays inside the file
    with pytest.raises(ValueError, match="direction.2 starts at byte 32 of the data, expected 64"):
        import_gguf(path)


def test_gguf_valid_file_still_loads(tmp_path):
    vectors = {1: torch.randn(12), 5: torch.randn(12)}
    export_gguf(tmp_path / "ok.gguf", vectors, model_hint="llama")
    back, _ = import_gguf(tmp_path / "ok.gguf")
    assert list(back) == [1, 5] and all(torch.equal(back[k], v) for k, v in vectors.items())


# --- Thresholds.load ---------------------------------------------------------------------------------

def _thresholds_file(path, **fields):
    data = {"format": sparse.thresholds.FORMAT, "values": {"0.qkv": 0.1, "1.qkv": 0.2},
            "sparsity": {"0.qkv": 0.5}, "target": 0.5, "meta": {"model_type": "llama"}}
    data.update(fields)
    for k in [k for k, v in data.items() if v is _DROP]:
        del data[k]
    torch.save(data, path)
    return path


_DROP = object()


def test_thresholds_valid_file_loads(tmp_path):
    t = sparse.Thresholds.load(_thresholds_file(tmp_path / "ok.pt"))
    assert t[(1, "qkv")] == 0.2 and t.target == 0.5 and t.sparsity == {(0, "qkv"): 0.5}


@pytest.mark.parametrize("fields, match", [
    ({"target": float("nan")}, "target"),
    ({"target": 7.0}, "target"),
    ({"target": -0.1}, "target"),
    ({"target": "0.5"}, "target"),
    ({"target": True}, "target"),
    ({"sparsity": {"5.qkv": float("nan")}}, "5, 'qkv'"),
    ({"sparsity": {"0.qkv": float("nan")}}, "sparsity"),
    ({"sparsity": {"0.qkv": 1.5}}, "sparsity"),
    ({"sparsity": {"0.qkv": "0.5"}}, "sparsity"),
    ({"values": {"qkv": 0.1}}, "'qkv'"),
    ({"values": {"01.qkv": 0.1, "1.qkv": 0.2}}, "01.qkv"),
    ({"values": {"-1.qkv": 0.1}}, "-1.qkv"),
    ({"values": {"\u0663.qkv": 0.1}}, "qkv"),
    ({"values": {3: 0.1}}, "key 3"),
    ({"values": {"0.attn": 0.1}}, "attn"),
    ({"values": {"0.qkv": float("nan")}}, "finite"),
    ({"values": {"0.qkv": "0.1"}}, "number"),
    ({"values": [0.1]}, "values must be a dict"),
    ({"values": _DROP}, "values"),
    ({"sparsity": _DROP}, "sparsity"),
    ({"target": _DROP}, "target"),
    ({"meta": _DROP}, "meta"),
    ({"meta": {"a": 1}}, "meta"),
    ({"format": "other"}, "not an actshift thresholds file"),
])
def test_thresholds_load_rejects_hostile_files(tmp_path, fields, match):
    path = _thresholds_file(tmp_path / "bad.pt", **fields)
    with pytest.raises(ValueError, match=match):
        sparse.Thresholds.load(path)


def test_thresholds_load_rejects_a_non_torch_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk.pt"):
        sparse.Thresholds.load(path)
