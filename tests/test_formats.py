"""Steering files: safetensors round trips with metadata, and GGUF control vectors checked through
gguf's own GGUFReader (the reader llama.cpp's format is defined by)."""
import gguf
import numpy as np
import pytest
import tiny_lm
import torch
from safetensors import safe_open

import actshift
from actshift.steering import export_gguf, import_gguf, load, save


def test_vectors_round_trip_with_metadata(tmp_path):
    model = tiny_lm.llama()
    vectors = {0: torch.randn(32), 1: torch.randn(2, 32).half()}
    path = tmp_path / "v.safetensors"
    save(path, vectors, model=model, method="caa", metadata={"note": "test"})
    data, meta = load(path, model=model)
    assert sorted(data) == [0, 1]
    torch.testing.assert_close(data[0], vectors[0])
    torch.testing.assert_close(data[1], vectors[1].float())
    assert meta["model_type"] == "llama" and meta["hidden_size"] == "32" and meta["layers"] == "[0, 1]"
    assert meta["method"] == "caa" and meta["note"] == "test" and meta["actshift.version"] == actshift.__version__
    with safe_open(str(path), "pt") as f:  # a plain safetensors file any reader can open
        assert set(f.keys()) == {"layer.0", "layer.1"}


def test_plans_round_trip(tmp_path):
    plans = {3: actshift.SteeringPlan(add=torch.randn(2, 16), weights=[0.5, -1.0], strength=2.5),
             5: actshift.SteeringPlan(add=torch.randn(16))}
    save(tmp_path / "p.safetensors", plans, method="pca")
    data, meta = load(tmp_path / "p.safetensors")
    assert sorted(data) == [3, 5] and meta["method"] == "pca"
    x = torch.randn(4, 16)
    for layer, plan in plans.items():
        assert isinstance(data[layer], actshift.SteeringPlan) and data[layer].strength == plan.strength
        torch.testing.assert_close(actshift.steer(x, data[layer], backend="reference"),
                                   actshift.steer(x, plan, backend="reference"))
    single = actshift.SteeringPlan(add=torch.randn(8), strength=-3.0)
    save(tmp_path / "one.safetensors", single)
    plan, _ = load(tmp_path / "one.safetensors")
    x = torch.randn(3, 8)
    torch.testing.assert_close(actshift.steer(x, plan, backend="reference"), actshift.steer(x, single, backend="reference"))
    assert plan.strength == -3.0


def test_save_load_bad_inputs(tmp_path):
    model = tiny_lm.llama()
    with pytest.raises(ValueError, match="hidden size"):
        save(tmp_path / "x.safetensors", {0: torch.randn(16)}, model=model)
    with pytest.raises(ValueError, match="data"):
        save(tmp_path / "x.safetensors", {})
    with pytest.raises(ValueError, match="same hidden size"):
        save(tmp_path / "x.safetensors", {0: torch.randn(16), 1: torch.randn(8)})
    with pytest.raises(ValueError, match="NaN"):
        save(tmp_path / "x.safetensors", {0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="no hidden size"):
        save(tmp_path / "x.safetensors", actshift.SteeringPlan(strength=2.0))
    with pytest.raises(ValueError, match="layer keys"):
        save(tmp_path / "x.safetensors", {"a": torch.randn(4)})
    save(tmp_path / "v.safetensors", {7: torch.randn(32)})
    with pytest.raises(ValueError, match="model has 2 layers"):
        load(tmp_path / "v.safetensors", model=model)
    save(tmp_path / "w.safetensors", {0: torch.randn(64)})
    with pytest.raises(ValueError, match="hidden size"):
        load(tmp_path / "w.safetensors", model=model)


def test_gguf_matches_llama_cpp_layout(tmp_path):
    vectors = {1: torch.randn(32), 3: torch.randn(32)}
    path = tmp_path / "cv.gguf"
    export_gguf(path, vectors, model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}
    for layer, v in vectors.items():
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [32]
        np.testing.assert_array_equal(t.data, v.numpy())
    back, meta = import_gguf(path)
    assert list(back) == [1, 3] and meta["controlvector.model_hint"] == "llama"
    for layer in vectors:
        assert torch.equal(back[layer], vectors[layer])


def test_gguf_reads_a_file_written_directly_with_gguf(tmp_path):
    """A file as repeng/llama.cpp tools write it, not by us."""
    path = tmp_path / "ext.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "mistral")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.1", np.arange(32, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    vectors, meta = import_gguf(path, model=tiny_lm.llama())
    assert torch.equal(vectors[1], torch.arange(32, dtype=torch.float32))


def test_gguf_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        export_gguf(tmp_path / "a.gguf", {0: torch.randn(8)}, model_hint="llama")
    with pytest.raises(ValueError, match="model_hint"):
        export_gguf(tmp_path / "a.gguf", {1: torch.randn(8)})
    with pytest.raises(ValueError, match=r"vectors\[1\] must be one vector"):
        export_gguf(tmp_path / "a.gguf", {1: torch.randn(2, 8)}, model_hint="llama")
    with pytest.raises(ValueError, match="hidden size"):
        export_gguf(tmp_path / "a.gguf", {1: torch.randn(8)}, model=tiny_lm.llama())
    path = tmp_path / "b.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_tensor("direction.0", np.ones(4, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="direction.0"):
        import_gguf(path)
    path = tmp_path / "c.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="architecture"):
        import_gguf(path)


def test_full_program_plan_round_trip(tmp_path):
    d = 16
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    plan = (actshift.SteeringPlan(add=torch.randn(2, d), weights=[1.0, -0.5], strength=1.5, renorm=True)
            .ablate(u, targets=[0.3]).affine(torch.rand(d) + 0.5, torch.randn(d))
            .neurons([1, 4], mul=[0.0, 2.0], add=[1.0, 0.0]).condition(torch.randn(d), 0.1, "projection", "<")
            .monitor(torch.randn(3, d)))
    save(tmp_path / "full.safetensors", {2: plan})
    back = load(tmp_path / "full.safetensors")[0][2]
    x = torch.randn(6, d)
    y0, m0 = actshift.steer(x, plan, return_monitors=True, backend="reference")
    y1, m1 = actshift.steer(x, back, return_monitors=True, backend="reference")
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(m1, m0)
    assert back.condition_kind == "projection" and back.condition_compare == "<" and back.renorm
