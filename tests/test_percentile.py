"""percentile_scale / scale_ratio / adascale_stats / energy: reference facts, every backend against
the reference (exact kept sets, ties, per-row k, NaN rows), custom-op machinery, bad inputs."""
import importlib

import pytest
import torch
from conftest import assert_close, device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference
from actshift.ops.percentile import percentile_k

METHODS = ["scale", "ash_p", "ash_b", "ash_s"]


def features(n, d, kind, device="cpu", gen=None):
    """Test features on a 1/64 grid: every partial sum is exact in fp32 whatever the order, so r is
    comparable across backends even where s2 is near 0 (there r = s1/s2 is ill-conditioned)."""
    z = (torch.randn(n, d, generator=gen) * 64).round() / 64
    if kind == "relu":  # pooled post-ReLU features: many exact zeros
        z = z.relu()
    elif kind == "ties":  # a few levels only: ties at the k-th value are the rule
        z = (z * 2).round() / 2
    elif kind == "negative":
        z = z - 1.0
    return z.to(device)


# --- reference against independent facts ------------------------------------------------------


def test_k_rounds_half_to_even():
    # ResNet-50: p=85 -> 307, p=90 -> 205, p=65 -> 717 (the ASH/SCALE papers' values)
    for p, k in ((85, 307), (90, 205), (65, 717)):
        assert percentile_k(2048, p, 1, torch.device("cpu")).item() == k
    # 10 * 25 / 100 = 2.5 rounds to 2 (even), so k = 8; 10 * 35 / 100 = 3.5 rounds to 4, k = 6
    assert percentile_k(10, 25.0, 1, torch.device("cpu")).item() == 8
    assert percentile_k(10, 35.0, 1, torch.device("cpu")).item() == 6


def test_reference_by_hand():
    z = torch.tensor([[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0]])  # s1 = 39
    # p = 70: k = 10 - 7 = 3 -> top values 9, 6, 5 (the first 5, index 4) -> s2 = 20
    y, r = actshift.percentile_scale(z, 70, "ash_p", return_ratio=True, backend="reference")
    assert torch.equal(y, torch.tensor([[0, 0, 0, 0, 5.0, 9.0, 0, 6.0, 0, 0]]))
    assert r.item() == pytest.approx(39 / 20)
    b = actshift.percentile_scale(z, 70, "ash_b", backend="reference")
    assert torch.allclose(b, (y != 0) * 13.0)  # s1 / k = 39 / 3
    s = actshift.percentile_scale(z, 70, "scale", backend="reference")
    assert torch.allclose(s, z * torch.exp(torch.tensor(39 / 20)))
    a = actshift.percentile_scale(z, 70, "ash_s", backend="reference")
    assert torch.allclose(a, y * torch.exp(torch.tensor(39 / 20)))
    assert torch.equal(actshift.percentile_scale(z, None, "react", clip=4.0, backend="reference"), z.clamp(max=4.0))


def test_reference_matches_topk_sums_and_tie_free_sets():
    z = torch.randn(7, 300)
    k = percentile_k(300, 85, 7, torch.device("cpu"))
    y, r = reference.percentile_scale(z, k, "ash_p")
    top = torch.topk(z, int(k[0]), dim=1)
    assert torch.allclose(r, z.sum(1) / top.values.sum(1), rtol=1e-5)
    expect = torch.zeros_like(z).scatter_(1, top.indices, top.values)
    assert torch.equal(y, expect)  # no ties in random data: the same set as torch.topk


# --- every backend against the reference ---------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "negative"])
def test_matches_reference(device, backend, kind):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(1)
    for n, d in ((1, 1), (3, 2), (5, 7), (4, 100), (2, 2048)):
        z32 = features(n, d, kind, device, gen)
        k = torch.randint(1, d + 1, (n,), generator=gen, dtype=torch.int32)  # a different k per row
        k[0], k[-1] = 1, d  # the extremes
        k = k.to(device)
        for dtype in dtypes_for(backend, device):
            z = z32.to(dtype)
            for method in METHODS + ["ratio"]:
                y, r = importlib.import_module("actshift.ops.percentile").run_percentile(z, k, method, None, backend)
                ye, re = reference.percentile_scale(z, k, method)
                assert_close(r, re, torch.float32) if dtype == torch.float32 else assert_close(r, re, dtype)
                if method != "ratio":
                    assert y.dtype == dtype and y.shape == z.shape
                    assert_close(y, ye, dtype)
                if method == "ash_p":  # the kept set is exact on every backend, ties included
                    kept = reference.topk_mask(z.float(), k)
                    assert torch.equal(y.float() != 0, kept & (z.float() != 0))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_clip_react_nan_rows_and_empty(device, backend):
    require_backend(backend, device)
    z = features(5, 64, "normal", device)
    z[1, 3] = float("nan")
    z[2, 5] = float("-inf")
    z[3, 7] = float("inf")  # clipped to 0.5 below, so row 3 stays finite
    y, r = actshift.percentile_scale(z, 80, "ash_s", clip=0.5, return_ratio=True, backend=backend)
    ye, re = actshift.percentile_scale(z, 80, "ash_s", clip=0.5, return_ratio=True, backend="reference")
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isnan(r[1:3]).all()
    assert torch.isfinite(y[[0, 3, 4]]).all()
    assert_close(y[[0, 3, 4]], ye[[0, 3, 4]], torch.float32)
    assert_close(r[[0, 3, 4]], re[[0, 3, 4]], torch.float32)
    assert torch.equal(actshift.percentile_scale(z, method="react", clip=0.25, backend=backend)[0], z[0].clamp(max=0.25))
    empty = torch.empty(0, 16, device=device)
    y, r = actshift.percentile_scale(empty, 50, return_ratio=True, backend=backend)
    assert y.shape == (0, 16) and r.shape == (0,)
    four_d = z[[0, 4]].reshape(2, 64, 1, 1)
    assert actshift.percentile_scale(four_d, 90, "ash_b", backend=backend).shape == (2, 64, 1, 1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 6),
    d=st.integers(1, 300),
    kind=st.sampled_from(["normal", "relu", "ties", "negative"]),
    method=st.sampled_from(METHODS),
    clip=st.one_of(st.none(), st.integers(-64, 128).map(lambda i: i / 64)),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, n, d, kind, method, clip, dtype, seed):
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    gen = torch.Generator().manual_seed(seed)
    z = features(n, d, kind, gen=gen).to(dtype)
    k = torch.randint(1, d + 1, (n,), generator=gen, dtype=torch.int32)
    ops = importlib.import_module("actshift.ops.percentile")
    y, r = ops.run_percentile(z, k, method, clip, backend)
    ye, re = reference.percentile_scale(z, k, method, clip)
    torch.testing.assert_close(r, re, rtol=1e-5, atol=1e-5, equal_nan=True)
    # ash_b/ash_s outputs scale with s1/k and e^r: compare relative to the row's magnitude.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.float(), ye.float(), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_adascale_stats_and_ratio(device, backend):
    require_backend(backend, device)
    for kind in ("relu", "ties", "normal"):
        z = features(6, 500, kind, device)
        zt = z + 0.1 * torch.randn_like(z)
        q, c_o = actshift.adascale_stats(z, zt, 5, 25, backend=backend)
        # independent of the reference: direct sums over a stable descending sort
        idx = torch.sort(z, dim=1, descending=True, stable=True).indices
        assert_close(q, (z - zt).abs().gather(1, idx[:, :5]).sum(1), torch.float32)
        assert_close(c_o, zt.clamp(min=0).gather(1, idx[:, :25]).sum(1), torch.float32)
        r = actshift.scale_ratio(z, 85, backend=backend)
        assert_close(r, actshift.percentile_scale(z, 85, return_ratio=True, backend="reference")[1], torch.float32)


# --- energy -----------------------------------------------------------------------------------------


def test_energy():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expect = torch.log(torch.exp(logits).sum(1))
    assert torch.allclose(actshift.energy(logits), expect)
    assert torch.allclose(actshift.energy(logits, 2.0), 2 * torch.log(torch.exp(logits / 2).sum(1)))
    assert actshift.energy(logits.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        actshift.energy(logits, 0.0)
    with pytest.raises(TypeError, match="logits"):
        actshift.energy(torch.ones(2, 3, dtype=torch.long))


# --- custom-op machinery -----------------------------------------------------------------------------


def test_triton_rejects_rows_longer_than_a_program():
    require_backend("triton", "cpu")
    with pytest.raises(ValueError, match="16384"):
        actshift.percentile_scale(torch.randn(1, 16385), 85, backend="triton")


def test_opcheck_cpu_ops():
    require_backend("cpu", "cpu")
    z = torch.randn(4, 40).relu()
    k = torch.tensor([1, 10, 40, 7], dtype=torch.int32)
    for method in range(6):
        torch.library.opcheck(torch.ops.actshift.percentile_scale.default, (z, k, method, 0.7 if method == 5 else None))
    torch.library.opcheck(torch.ops.actshift.adascale_stats.default, (z, z + 0.1, 3, 8))


@pytest.mark.triton
def test_opcheck_triton_ops():
    require_backend("triton", "cpu")
    importlib.import_module("actshift.ops.percentile")._triton_ready()
    z = torch.randn(3, 40)
    k = torch.tensor([1, 10, 40], dtype=torch.int32)
    torch.library.opcheck(torch.ops.actshift.percentile_scale_triton.default, (z, k, 1, None))
    torch.library.opcheck(torch.ops.actshift.percentile_scale_triton.default, (z, k, 0, 0.5))
    torch.library.opcheck(torch.ops.actshift.adascale_stats_triton.default, (z, z + 0.1, 3, 8))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()

    def f(z):
        y, r = actshift.percentile_scale(z * 1.5, 85.0, "ash_s", return_ratio=True, backend=backend)
        return y.sum(1) + r

    z = torch.randn(5, 128).relu()
    assert_close(torch.compile(f, fullgraph=True)(z), f(z), torch.float32)


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    z = torch.randn(4, 32)
    cases = [
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, 0)),
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, 100)),
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, float("nan"))),
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, torch.tensor([50.0, 50, 120, 50]))),
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, torch.tensor([50.0, 50]))),
        (ValueError, "keeps no element", lambda: actshift.percentile_scale(z, 99)),
        (TypeError, "percentile", lambda: actshift.percentile_scale(z, "85")),
        (ValueError, "method", lambda: actshift.percentile_scale(z, 85, "ash")),
        (ValueError, "percentile", lambda: actshift.percentile_scale(z, None, "scale")),
        (ValueError, "clip", lambda: actshift.percentile_scale(z, None, "react")),
        (ValueError, "clip", lambda: actshift.percentile_scale(z, 85, clip=float("inf"))),
        (ValueError, "return_ratio", lambda: actshift.percentile_scale(z, None, "react", clip=1.0, return_ratio=True)),
        (ValueError, "z", lambda: actshift.percentile_scale(torch.randn(2, 3, 4, 4), 85)),
        (ValueError, "z", lambda: actshift.percentile_scale(torch.randn(32), 85)),
        (TypeError, "z", lambda: actshift.percentile_scale(z.double(), 85)),
        (TypeError, "z", lambda: actshift.percentile_scale(z.numpy(), 85)),
        (ValueError, "z_perturbed", lambda: actshift.adascale_stats(z, z[:2], 1, 2)),
        (ValueError, "k1", lambda: actshift.adascale_stats(z, z, 0, 2)),
        (ValueError, "k2", lambda: actshift.adascale_stats(z, z, 1, 33)),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()


def test_cpp_op_checks_direct_calls():
    require_backend("cpu", "cpu")
    z = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.actshift.percentile_scale(z, torch.tensor([0, 1, 2], dtype=torch.int32), 1, None)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.actshift.percentile_scale(z, torch.tensor([11, 1, 2], dtype=torch.int32), 1, None)
    with pytest.raises(TypeError, match="k must be int32"):
        torch.ops.actshift.percentile_scale(z, torch.tensor([1, 1, 2]), 1, None)
    with pytest.raises(ValueError, match="method"):
        torch.ops.actshift.percentile_scale(z, torch.tensor([1, 1, 2], dtype=torch.int32), 9, None)
    with pytest.raises(ValueError, match="react needs a clip"):
        torch.ops.actshift.percentile_scale(z, torch.tensor([1, 1, 2], dtype=torch.int32), 5, None)
    with pytest.raises(ValueError, match="k1 and k2"):
        torch.ops.actshift.adascale_stats(z, z, 0, 1)
