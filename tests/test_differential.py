"""Differential campaign: every op on every backend that runs here ("cpu", and "triton" under the
interpreter), in every dtype it takes, against the reference backend, over random shapes, memory
layouts (row strides, storage offsets, expanded rows and per-row tensors), aliasing (out=x, out
interleaved with x in one buffer) and special values (NaN of either sign, ±inf, -0.0, large).

Each test draws its backend and dtype, so a bounded max_examples covers them all; the whole file
runs in about a minute on 2 cores (the Triton interpreter is the slow part).
"""
import pytest
import torch
from conftest import TOL, dtypes_for, require_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_steer_program import full_plans

import actshift
from actshift import reference
from actshift.ops.percentile import METHODS

BACKENDS = ["cpu", "triton"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NEG_NAN = -4194304  # the int32 bits of the NaN that inf - inf gives on x86 (sign bit set)
SPECIAL = ["nan", "-nan", "inf", "-inf", "-0.0", "big"]


@pytest.fixture(autouse=True, scope="module")
def _backends_here():
    for b in BACKENDS:
        require_backend(b, "cpu")


@st.composite
def backend_and_dtype(draw):
    backend = draw(st.sampled_from(BACKENDS))
    return backend, draw(st.sampled_from(dtypes_for(backend, "cpu")))


@st.composite
def values(draw, shape, dtype, special=True, low=None):
    """Random values of `dtype`, with a few special values sprinkled in when `special`."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=g) * draw(st.sampled_from([1.0, 20.0]))
    if low is not None:
        t = t.abs() + low
    if special and t.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, min(3, t.numel())))):
            i = draw(st.integers(0, t.numel() - 1))
            kind = draw(st.sampled_from(SPECIAL))
            if kind == "-nan":
                t.view(-1).view(torch.int32)[i] = NEG_NAN
            else:
                t.view(-1)[i] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                                 "-0.0": -0.0, "big": 6e4}[kind]
    return t.to(dtype)


@st.composite
def placed(draw, t: torch.Tensor, expand: bool = False) -> torch.Tensor:
    """t's values (rows of a 2-d t, or a 1-d t) in a drawn layout: contiguous, a row stride wider
    than the row, a storage offset, or (when `expand`) one row / value expanded with stride 0."""
    kinds = ["contiguous", "row_stride", "offset"] + (["expand"] if expand and t.shape[0] > 0 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "contiguous":
        return t.clone()
    if kind == "expand":
        return t[:1].expand(t.shape)
    if kind == "offset":
        off = draw(st.integers(1, 3))
        buf = torch.empty(t.numel() + off, dtype=t.dtype)
        view = buf[off:].view(t.shape)
    elif t.dim() == 1:
        view = torch.empty(t.shape[0] * 2, dtype=t.dtype)[::2]
    else:
        pad = draw(st.integers(1, 5))
        view = torch.empty(t.shape[0], t.shape[1] + pad, dtype=t.dtype)[:, pad // 2:pad // 2 + t.shape[1]]
    view.copy_(t)
    return view


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t (any layout), so equality sees NaN payloads and -0.0."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def close(actual, expected, dtype, scale=None):
    """Against the fp32 reference rounded to the output's dtype (the contract: fp32 math, one
    rounding at the end), within the dtype's tolerance; the absolute part scales with the operands'
    magnitude (errors of sums grow with it). NaN must meet NaN, inf the same inf."""
    tol = TOL[dtype]
    expected = expected.to(actual.dtype)
    finite = expected.float()[torch.isfinite(expected.float())]
    mag = scale if scale is not None else (float(finite.abs().max()) if finite.numel() else 1.0)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(1.0, mag), equal_nan=True)


# --- steer: the additive kernel and the full program -----------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_steer(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    rows, d = draw(st.integers(0, 6)), draw(st.integers(1, 40))
    program = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pool = full_plans(d, g) if program else [actshift.SteeringPlan(add=torch.randn(m, d, generator=g), strength=s)
                                             for m, s in ((1, 1.5), (2, -0.7), (3, 2.0))]
    plans = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    x = draw(placed(draw(values((rows, d), dtype)), expand=True))
    slot = gate = None
    if len(plans) > 1 or draw(st.booleans()):
        slot = draw(placed(torch.randint(-1, len(plans), (rows,), generator=g,
                                         dtype=draw(st.sampled_from([torch.int32, torch.int64]))), expand=True))
    if draw(st.booleans()):
        gate = draw(placed(torch.rand(rows, generator=g) * 2, expand=True))
    monitors = program and draw(st.booleans())
    want = actshift.steer(x.float(), plans, slot=slot, gate=gate, return_monitors=monitors, backend="reference")
    x_before = x.clone()

    mode = draw(st.sampled_from(["new", "in_place", "separate", "interleaved"]))
    out = None
    if mode == "in_place":
        out = x
    elif mode == "separate":
        out = draw(placed(torch.zeros(rows, d, dtype=dtype)))
    elif mode == "interleaved":  # x and out side by side in the rows of one buffer
        base = torch.empty(rows, 2 * d, dtype=dtype)
        base[:, :d] = x
        x, out = base[:, :d], base[:, d:]
    if out is not None and rows > 1 and out.stride(0) == 0:  # an expanded x written in place
        with pytest.raises(ValueError, match="internal overlap"):
            actshift.steer(x, plans, slot=slot, gate=gate, out=out, backend=backend)
        return
    got = actshift.steer(x, plans, slot=slot, gate=gate, out=out, return_monitors=monitors, backend=backend)
    y, mon = got if monitors else (got, None)
    if out is not None:
        assert y is out
    close(y, want[0] if monitors else want, dtype)
    if monitors:  # fp32 dot products of the (upcast) input: error grows with d · |x| · |M|
        finite = x_before.float()[x_before.float().isfinite()]
        close(mon, want[1], torch.float32, scale=d * (float(finite.abs().max()) if finite.numel() else 1.0) * 4)
    if mode != "in_place":
        assert torch.equal(bits(x), bits(x_before))
    if slot is not None:  # rows with slot -1 are bit-exact copies, NaN payloads included
        keep = slot.long() < 0
        assert torch.equal(bits(y[keep]), bits(x_before[keep]))


# --- percentile scaling and AdaSCALE statistics -----------------------------------------------------


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_percentile_scale(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    n, d = draw(st.integers(0, 5)), draw(st.integers(1, 48))
    # Post-ReLU features (the use case): r = Σz / Σtop-k stays well conditioned.
    z = draw(placed(draw(values((n, d), dtype, low=0.0))))
    method = draw(st.sampled_from(METHODS))
    clip = draw(st.sampled_from([None, 0.5, 3.0])) if method != "react" else draw(st.sampled_from([0.5, 3.0]))
    p = draw(st.floats(1.0, 99.0))
    if method != "react" and d - round(d * p / 100) < 1:  # keeps no element: refused
        with pytest.raises(ValueError, match="keeps no element"):
            actshift.percentile_scale(z, p, method, clip=clip, backend=backend)
        return
    got = actshift.percentile_scale(z, p, method, clip=clip, backend=backend)
    want = actshift.percentile_scale(z.float(), p, method, clip=clip, backend="reference")
    close(got, want, dtype)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_adascale_stats(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    n, d = draw(st.integers(0, 5)), draw(st.integers(1, 48))
    z = draw(placed(draw(values((n, d), dtype))))
    zp = draw(placed(draw(values((n, d), dtype))))
    k1, k2 = draw(st.integers(1, d)), draw(st.integers(1, d))
    q, c_o = actshift.adascale_stats(z, zp, k1, k2, backend=backend)
    eq, ec = reference.adascale_stats(z, zp, k1, k2)
    close(q, eq, dtype, scale=float(eq[eq.isfinite()].abs().sum()) if n else 1.0)
    close(c_o, ec, dtype, scale=float(ec[ec.isfinite()].abs().sum()) if n else 1.0)


# --- sparse ops --------------------------------------------------------------------------------------


@st.composite
def threshold(draw, n: int):
    if n > 0 and draw(st.booleans()):
        return torch.rand(n) * 2
    return draw(st.sampled_from([0.0, 0.3, 1.5]))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sparse_threshold(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    rows, n = draw(st.integers(0, 5)), draw(st.integers(0, 40))
    x = draw(placed(draw(values((rows, n), dtype)), expand=True))
    t = draw(threshold(n))
    got = actshift.sparse_threshold(x, t, backend=backend)
    close(got, reference.sparse_threshold(x, t), dtype, scale=0.0)  # elementwise: exact but for rounding


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sparse_linear(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    rows = draw(st.sampled_from([0, 1, 2, 5, 9, 17]))  # 17: past the sparse path's 16 rows
    n, out = draw(st.integers(0, 40)), draw(st.integers(1, 24))
    x = draw(placed(draw(values((rows, n), dtype)), expand=True))
    w = draw(values((n, out), dtype, special=False))
    b = draw(values((out,), dtype, special=False)) if draw(st.booleans()) else None
    t = draw(threshold(n))
    got = actshift.sparse_linear(x, w, t, b, backend=backend)
    want = reference.sparse_linear(x.float(), w.float(), t, None if b is None else b.float())
    close(got, want, dtype, scale=float(x.float()[x.float().isfinite()].abs().sum() * w.float().abs().max()) if rows * n else 1.0)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_relu_ffn(data):
    draw = data.draw
    backend, dtype = draw(backend_and_dtype())
    rows, d, ffn = draw(st.sampled_from([0, 1, 3, 8, 9])), draw(st.integers(1, 24)), draw(st.integers(1, 40))
    act = draw(st.sampled_from(reference.SPARSE_ACTS))
    gated = act in reference.GATED_ONLY_ACTS or draw(st.booleans())
    t = draw(st.sampled_from([0.0, 0.5])) if act in reference.THRESHOLD_ACTS else 0.0
    x = draw(placed(draw(values((rows, d), dtype, special=draw(st.booleans()))), expand=True))
    wg, wu, wd = (draw(values((ffn, d), dtype, special=False)) * 0.3 for _ in range(3))
    got = actshift.relu_ffn(x, wg, wu if gated else None, wd, act, t, backend=backend)
    want = reference.relu_ffn(x.float(), wg.float(), wu.float() if gated else None, wd.float(), act, t)
    finite = want[want.isfinite()]
    close(got, want, dtype, scale=float(finite.abs().max()) * 4 if finite.numel() else 1.0)
