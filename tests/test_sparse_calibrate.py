"""Calibration: histogram quantiles vs exact ones, thresholds per site, greedy allocation,
save/load, realized sparsity on held-out data, bad input."""
import math

import pytest
import torch
from _sparse_models import batches, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from actshift import sparse
from actshift.sparse import sites as sparse_sites


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), s=st.floats(0.0, 0.999), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]),
       zeros=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_histogram_quantile_matches_exact_quantile(n, s, scale, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[torch.rand(n, generator=g) < zeros] = 0.0
    h = sparse.Histogram()
    h.add(x[: n // 2])
    h.add(x[n // 2:])  # streaming: two chunks
    t = h.quantile(s)
    a = x.abs().double()
    if t == 0.0:
        assert (a == 0).double().mean().item() >= s
    else:
        # t is an s-quantile of |x| to within the histogram's relative resolution (0.085%).
        assert (a <= t * 1.001).double().mean().item() >= s - 1e-12
        assert (a < t / 1.001).double().mean().item() <= s + 1e-12
    assert math.isfinite(t) and t >= 0


def test_histogram_counts_nan_and_inf_as_kept():
    h = sparse.Histogram()
    h.add(torch.tensor([float("nan"), float("inf"), 0.0, 1.0]))
    assert h.total == 4
    assert h.quantile(0.25) == 0.0
    assert h.fraction_at_or_below(0.0) == 0.25


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def test_uniform_calibration_realized_on_held_out(llama):
    calib, held_out = batches(4, seed=1), batches(3, seed=99)
    for target in (0.25, 0.5, 0.75):
        thr = sparse.calibrate(llama, calib, target, progress=False)
        assert thr.sites == sparse.TEAL_SITES and thr.num_layers == 2 and thr.mode == "teal"
        assert all(v == target for v in thr.sparsity.values())
        real = sparse.realized_sparsity(llama, thr, held_out)
        assert set(real) == set(thr.values)
        assert abs(real.mean - target) < 0.05, str(real)
        # Per site it drifts more: thresholds come from dense activations, and upstream sparsity
        # shrinks the inputs of o and down (so they come out sparser than their target).
        assert all(abs(f - target) < 0.15 for f in real.values()), str(real)
        assert "qkv" in str(real) and "mean" in str(real)


def test_calibrated_thresholds_are_site_quantiles(llama):
    """The qkv threshold of layer 0 is the target quantile of |input of q_proj| (an independent
    computation with a plain hook and torch.quantile)."""
    data = batches(2, seed=3)
    seen = []
    h = llama.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().flatten()))
    with torch.no_grad():
        for b in data:
            llama(input_ids=b)
    h.remove()
    exact = torch.quantile(torch.cat(seen).double(), 0.6).item()
    thr = sparse.calibrate(llama, data, 0.6, sites=("qkv",), progress=False)
    assert thr.sites == ("qkv",)
    assert thr[(0, "qkv")] == pytest.approx(exact, rel=5e-3)


def test_greedy_keeps_parameter_weighted_target(llama):
    calib = batches(2, seed=4)
    thr = sparse.calibrate(llama, calib, 0.5, greedy=True, greedy_step=0.05, progress=False)
    lays = sparse_sites.layers(llama)
    for i, layer in enumerate(lays):
        w = {s: sparse_sites.site_params(layer, s) for s in sparse.TEAL_SITES}
        eff = sum(w[s] * thr.sparsity[(i, s)] for s in w) / sum(w.values())
        assert eff == pytest.approx(0.5, abs=1e-6)
        # A real allocation: not every site at the target.
        assert max(abs(thr.sparsity[(i, s)] - 0.5) for s in w) > 0.02
    assert thr.meta["method"] == "greedy"
    real = sparse.realized_sparsity(llama, thr, batches(2, seed=98))
    assert abs(real.mean - 0.5) < 0.05, str(real)


def test_greedy_beats_uniform_on_block_error(llama):
    """On its own calibration data, the greedy allocation perturbs the first block's output (what
    it minimizes; the block's input, the embeddings, is the same either way) less than uniform
    thresholds of the same parameter-weighted sparsity."""
    calib = batches(2, seed=5)
    uni = sparse.calibrate(llama, calib, 0.6, progress=False)
    gre = sparse.calibrate(llama, calib, 0.6, greedy=True, greedy_step=0.05, progress=False)

    def err(thr):
        with torch.no_grad():
            ref = torch.cat([llama.model(input_ids=b, output_hidden_states=True).hidden_states[1] for b in calib])
            with sparse.simulate(llama, thr):
                out = torch.cat([llama.model(input_ids=b, output_hidden_states=True).hidden_states[1] for b in calib])
        return ((out - ref).norm() / ref.norm()).item()

    assert err(gre) < 0.9 * err(uni)


def test_cats_calibration(llama):
    thr = sparse.calibrate(llama, batches(3, seed=6), 0.5, sites="cats", progress=False)
    assert thr.mode == "cats" and thr.sites == ("cats",)
    real = sparse.realized_sparsity(llama, thr, batches(2, seed=97))
    assert abs(real.mean - 0.5) < 0.05


@pytest.mark.parametrize("kind", ["gpt2", "bert", "opt", "qwen3"])
def test_calibration_other_architectures(kind):
    m = tiny(kind)
    thr = sparse.calibrate(m, batches(2, seed=7), 0.4, progress=False)
    assert len(thr) == 2 * len(sparse.TEAL_SITES)
    assert abs(sparse.realized_sparsity(m, thr, batches(2, seed=96)).mean - 0.4) < 0.05


def test_save_load_roundtrip(llama, tmp_path):
    thr = sparse.calibrate(llama, batches(1), 0.5, greedy=True, greedy_step=0.1, progress=False)
    path = tmp_path / "thr.pt"
    thr.save(path)
    back = sparse.Thresholds.load(path)
    assert back.values == thr.values and back.sparsity == thr.sparsity
    assert back.target == 0.5 and back.meta == thr.meta and back.mode == "teal"
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="path"):
        sparse.Thresholds.load(tmp_path / "bad.pt")


def test_bad_input(llama):
    data = batches(1)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_sparsity"):
            sparse.calibrate(llama, data, bad, progress=False)
    with pytest.raises(TypeError, match="target_sparsity"):
        sparse.calibrate(llama, data, "half", progress=False)
    with pytest.raises(ValueError, match="sites"):
        sparse.calibrate(llama, data, 0.5, sites=("qkv", "mlp"), progress=False)
    with pytest.raises(ValueError, match="sites"):
        sparse.calibrate(tiny("gpt2"), data, 0.5, sites="cats", progress=False)
    with pytest.raises(ValueError, match="greedy"):
        sparse.calibrate(llama, data, 0.5, sites="cats", greedy=True, progress=False)
    with pytest.raises(ValueError, match="greedy_step"):
        sparse.calibrate(llama, data, 0.5, greedy=True, greedy_step=0.0, progress=False)
    with pytest.raises(ValueError, match="batches"):
        sparse.calibrate(llama, [], 0.5, progress=False)
    with pytest.raises(TypeError, match="batches"):
        sparse.calibrate(llama, [[1, 2, 3]], 0.5, progress=False)
    with pytest.raises(ValueError, match="model"):
        sparse.calibrate(torch.nn.Linear(4, 4), data, 0.5, progress=False)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="values"):
            sparse.Thresholds({(0, "qkv"): bad})
    with pytest.raises(TypeError, match="values"):
        sparse.Thresholds({(0, "qkv"): "0.1"})
    with pytest.raises(ValueError, match="values"):
        sparse.Thresholds({(0, "attn"): 0.1})
    with pytest.raises(ValueError, match="values"):
        sparse.Thresholds({(0, "qkv"): 0.1, (0, "cats"): 0.1})
    with pytest.raises(ValueError, match="values"):
        sparse.Thresholds({})
    with pytest.raises(ValueError, match="value"):
        sparse.Thresholds.constant(llama, -0.5)
    with pytest.raises(ValueError, match="thresholds"):
        sparse.realized_sparsity(llama, sparse.Thresholds({(5, "qkv"): 0.1}), data)
