"""Regression tests of the ops' argument boundaries (issue 14): per-row tensors of any stride, views
that share a buffer, out= with internal overlap, errors before any in-place write, negative-sign
NaN, mixed meta/CPU arguments of the raw ops, and misaligned data pointers.

The misaligned-pointer tests pass on x86 either way (its loads tolerate any alignment); what they
guard is the undefined behaviour that `make test-asan` (UBSan) reports as "load of misaligned
address" when a kernel reads such memory through a typed pointer.
"""
import pytest
import torch
from conftest import assert_close, cpu_backends, dtypes_for, require_backend

import actshift
from actshift import reference
from actshift.steering.plan import SteeringBank

D = 16


def additive_bank():
    return [actshift.SteeringPlan(add=torch.randn(D), strength=1.5),
            actshift.SteeringPlan(add=torch.randn(2, D), weights=[1.0, -0.5], strength=-2.0)]


def program_bank():
    """Plans that need the full program (ablation, affine, neurons, monitors)."""
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    return [actshift.SteeringPlan(add=torch.randn(D)).ablate(u).monitor(torch.randn(2, D)),
            actshift.SteeringPlan(add=torch.randn(D)).affine(torch.rand(D) + 0.5, torch.randn(D))
            .neurons([1, 5], mul=2.0, add=0.1)]


def ref_steer(x, plans, **kw):
    return actshift.steer(x, plans, backend="reference", **kw)


# --- item 1: per-row tensors (gate, mask, slot, weights) of any stride ------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("make_bank", [additive_bank, program_bank], ids=["additive", "program"])
def test_expanded_and_strided_row_tensors(backend, make_bank):
    require_backend(backend, "cpu")
    plans = make_bank()
    x = torch.randn(2, 3, D)
    dense = dict(gate=torch.full((2, 3), 0.75), mask=torch.ones(2, 3, dtype=torch.bool),
                 slot=torch.ones(2, 3, dtype=torch.long))
    # Stride 0 everywhere (what `expand` gives, e.g. one gate or slot per request), and a gate
    # with row stride 2 (every other element of a buffer).
    expanded = dict(gate=torch.full((1, 1), 0.75).expand(2, 3), mask=torch.ones(1, dtype=torch.bool).expand(2, 3),
                    slot=torch.ones(1, 1, dtype=torch.long).expand(2, 3))
    strided = dict(gate=torch.full((2, 6), 0.75)[:, ::2], slot=torch.ones(2, 3, dtype=torch.int32))
    want = ref_steer(x, plans, **dense)
    for kw in (expanded, strided):
        torch.testing.assert_close(actshift.steer(x, plans, backend=backend, **kw), want, rtol=1e-5, atol=1e-5)
    # The example: one gate expanded over the rows of a 2-d x.
    x2 = torch.randn(3, D)
    torch.testing.assert_close(actshift.steer(x2, plans[0], gate=torch.ones(1).expand(3), backend=backend),
                               ref_steer(x2, plans[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_expanded_row_weights(backend):
    require_backend(backend, "cpu")
    plans = additive_bank()
    x = torch.randn(4, D)
    slot = torch.tensor([0, 1, 1, -1])
    w = torch.tensor([0.5, 2.0])
    want = ref_steer(x, plans, slot=slot, weights=w.repeat(4, 1))
    got = actshift.steer(x, plans, slot=slot, weights=w.expand(4, 2), backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_raw_ops_take_row_tensors_of_any_stride():
    """The C++ ops index gate, slot and row_weights by row stride: no copy, no contiguity error."""
    require_backend("cpu", "cpu")
    x = torch.randn(5, D)
    bank = SteeringBank(additive_bank())
    v, w, s = bank.tensors(x.device)
    gate = torch.tensor([0.5]).expand(5)
    slot = torch.arange(10, dtype=torch.int32)[::2] % 2  # stride 2
    want = reference.steer(x, v, w, s, gate.contiguous(), slot.contiguous())
    torch.testing.assert_close(torch.ops.actshift.steer(x, v, w, s, gate, slot), want)
    out = torch.empty_like(x)
    torch.ops.actshift.steer_out(x, v, w, s, gate, slot, out)
    torch.testing.assert_close(out, want)
    pbank = SteeringBank(program_bank())
    prog = pbank.program(x.device, folded=False)
    row_w = torch.tensor([0.25]).expand(5, pbank.max_vectors)
    y, mon = torch.ops.actshift.steer_program(x, *prog, gate, slot, row_w)
    ey, emon = reference.steer_program(x, *prog, gate.contiguous(), slot.contiguous(), row_w.contiguous())
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(mon, emon)


# --- item 2: false rejections ------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("make_bank", [additive_bank, program_bank], ids=["additive", "program"])
def test_disjoint_interleaved_views_are_not_overlap(backend, make_bank):
    require_backend(backend, "cpu")
    plans = make_bank()
    base = torch.randn(3, 2 * D)
    x, out = base[:, :D], base[:, D:]
    x_before = x.clone()
    slot = torch.tensor([0, 1, -1])
    want = ref_steer(x_before, plans, slot=slot)
    actshift.steer(x, plans, slot=slot, out=out, backend=backend)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("backend", cpu_backends())
def test_overlapping_views_are_still_rejected(backend):
    require_backend(backend, "cpu")
    plan = actshift.SteeringPlan(add=torch.randn(D))
    base = torch.randn(4, 2 * D)
    for x, out in ((base[:, :D], base[:, D // 2:D // 2 + D]),  # columns shared within a row
                   (base[:3, :D], base[1:, :D]),  # rows shifted by one
                   (base.view(-1)[: 3 * D].view(3, D), base[:3, :D])):  # different row strides, shared start
        with pytest.raises(ValueError, match="overlaps x"):
            actshift.steer(x, plan, out=out, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_size_one_last_dim_with_any_stride(backend):
    require_backend(backend, "cpu")
    plan = actshift.SteeringPlan(add=torch.tensor([2.0]))
    x = torch.randn(1, 3).t()  # [3, 1] with strides (1, 3): torch counts it as contiguous
    assert x.is_contiguous() and x.stride(1) != 1
    torch.testing.assert_close(actshift.steer(x, plan, backend=backend), x + 2.0)
    out = torch.zeros(1, 3).t()
    actshift.steer(x, plan, out=out, backend=backend)
    torch.testing.assert_close(out, x + 2.0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_sparse_ops_on_empty_channels(backend):
    require_backend(backend, "cpu")
    x = torch.zeros(2, 0)
    y = actshift.sparse_threshold(x, 0.5, backend=backend)
    assert y.shape == (2, 0)
    w, b = torch.zeros(0, 3), torch.tensor([1.0, -2.0, 3.0])
    y = actshift.sparse_linear(x, w, 0.5, b, backend=backend)
    torch.testing.assert_close(y, b.expand(2, 3))  # an empty sum, plus the bias
    y = actshift.sparse_linear(torch.zeros(2, 4, 0), w, 0.5, backend=backend)
    torch.testing.assert_close(y, torch.zeros(2, 4, 3))


def test_steer_program_out_errors_name_their_op():
    require_backend("cpu", "cpu")
    x = torch.randn(3, D)
    prog = SteeringBank(program_bank()).program(x.device, folded=True)
    for bad in (torch.empty(3, D, dtype=torch.float16), torch.empty(4, D), x[:, :1].expand(3, D)[:, :D]):
        with pytest.raises((TypeError, ValueError), match="^steer_program_out: out"):
            torch.ops.actshift.steer_program_out(x, *prog, None, None, None, bad)


# --- item 3: out= with internal overlap ----------------------------------------------------------


def overlapping_outs():
    expanded = torch.zeros(1, D).expand(3, D)
    buf = torch.zeros(3 * D)
    rows_overlap = buf.as_strided((3, D), (D // 2, 1))  # row r starts half a row after row r - 1
    return [expanded, rows_overlap]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("make_bank", [additive_bank, program_bank], ids=["additive", "program"])
def test_out_with_internal_overlap_is_rejected(backend, make_bank):
    require_backend(backend, "cpu")
    plans = make_bank()[:1]
    for out in overlapping_outs():
        before = out.clone()
        with pytest.raises(ValueError, match="internal overlap"):
            actshift.steer(out, plans, out=out, backend=backend)  # the in-place example
        with pytest.raises(ValueError, match="internal overlap"):
            actshift.steer(torch.randn(3, D), plans, out=out, backend=backend)
        assert torch.equal(out, before)


def test_raw_out_ops_reject_internal_overlap():
    require_backend("cpu", "cpu")
    x = torch.randn(3, D)
    v, w, s = SteeringBank(additive_bank()[:1]).tensors(x.device)
    prog = SteeringBank(program_bank()[:1]).program(x.device, folded=True)
    for out in overlapping_outs():
        with pytest.raises(ValueError, match="^steer: out has internal overlap"):
            torch.ops.actshift.steer_out(x, v, w, s, None, None, out)
        with pytest.raises(ValueError, match="^steer_program_out: out has internal overlap"):
            torch.ops.actshift.steer_program_out(x, *prog, None, None, None, out)


# --- item 6: every check before the first write ---------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("make_bank", [additive_bank, program_bank], ids=["additive", "program"])
def test_bad_slot_leaves_out_untouched(backend, make_bank):
    require_backend(backend, "cpu")
    plans = make_bank()
    x = torch.randn(3, D)
    before = x.clone()
    with pytest.raises(ValueError, match="slot"):
        actshift.steer(x, plans, slot=torch.tensor([0, 1, 7]), out=x, backend=backend)
    assert torch.equal(x, before)


def test_raw_ops_check_slots_before_writing():
    require_backend("cpu", "cpu")
    x = torch.randn(3, D)
    before = x.clone()
    slot = torch.tensor([0, 1, 7])
    v, w, s = SteeringBank(additive_bank()).tensors(x.device)
    with pytest.raises(ValueError, match=r"^steer: slot\[2\] = 7 is out of range"):
        torch.ops.actshift.steer_out(x, v, w, s, None, slot, x)
    prog = SteeringBank(program_bank()).program(x.device, folded=True)
    with pytest.raises(ValueError, match=r"^steer_program_out: slot\[2\] = 7 is out of range"):
        torch.ops.actshift.steer_program_out(x, *prog, None, slot, None, x)
    assert torch.equal(x, before)


# --- item 7: a NaN with the sign bit set is a NaN -------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
def test_adascale_negative_nan(backend):
    require_backend(backend, "cpu")
    inf = torch.tensor([float("inf")])
    neg_nan = inf - inf  # what x86 gives: the sign bit set
    assert neg_nan.view(torch.int32).item() < 0
    z = torch.tensor([[1.0, 2.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5]])
    z[0, 3] = neg_nan
    z[1, 3] = float("nan")
    zp = z + 0.25
    q, c_o = actshift.adascale_stats(z, zp, 1, 2, backend=backend)
    eq, ec = reference.adascale_stats(z, zp, 1, 2)
    assert eq.isnan().all()  # torch.sort puts every NaN first: it is in the top 1
    torch.testing.assert_close(q, eq, equal_nan=True)
    torch.testing.assert_close(c_o, ec, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
def test_adascale_nan_outside_the_top_k_is_not_summed(backend):
    """Q and C_o sum over the top-k positions only: a NaN of z_perturbed elsewhere is not read
    (the reference multiplied by the mask, and NaN · 0 is NaN)."""
    require_backend(backend, "cpu")
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    zp = torch.tensor([[2.5, 2.0, 1.0, float("nan")]])
    q, c_o = actshift.adascale_stats(z, zp, 1, 2, backend=backend)
    torch.testing.assert_close(q, torch.tensor([0.5]))
    torch.testing.assert_close(c_o, torch.tensor([4.5]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make_bank", [additive_bank, program_bank], ids=["additive", "program"])
def test_untouched_rows_are_bit_exact_copies(backend, dtype, make_bank):
    """slot -1 copies the row as it is: NaN sign and payload too (found by test_differential: the
    cpu additive kernel rounded such rows through fp32, which canonicalises a bf16 NaN)."""
    require_backend(backend, "cpu")
    if dtype not in dtypes_for(backend, "cpu"):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    x = torch.randn(2, D).to(dtype)
    raw = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
    nan_bits = {2: (-63 if dtype == torch.bfloat16 else -511), 4: -4194303}[x.element_size()]  # -NaN with a payload
    raw[1, :3] = nan_bits
    y = actshift.steer(x, make_bank(), slot=torch.tensor([0, -1]), backend=backend)
    assert torch.equal(y[1].view(raw.dtype), raw[1])


# --- item 10: raw ops with meta and CPU arguments mixed ------------------------------------------


def test_raw_ops_reject_mixed_meta_and_cpu():
    require_backend("cpu", "cpu")
    x = torch.randn(3, D)
    meta = lambda t: t.to("meta")  # noqa: E731
    v, w, s = SteeringBank(additive_bank()[:1]).tensors(x.device)
    prog = list(SteeringBank(program_bank()[:1]).program(x.device, folded=True))
    t = torch.tensor([0.5])
    wt = torch.randn(D, 4)
    wg, wd = torch.randn(8, D), torch.randn(8, D)
    k = torch.full((3,), 2, dtype=torch.int32)
    cases = [
        ("steer", "vectors", lambda: torch.ops.actshift.steer(meta(x), v, w, s, None, None)),
        ("steer", "x", lambda: torch.ops.actshift.steer(x, meta(v), meta(w), meta(s), None, None)),
        ("steer", "out", lambda: torch.ops.actshift.steer_out(x, v, w, s, None, None, meta(x))),
        ("steer_program", "meta", lambda: torch.ops.actshift.steer_program(meta(x), *prog, None, None, None)),
        ("steer_program_out", "out",
         lambda: torch.ops.actshift.steer_program_out(x, *prog, None, None, None, meta(x))),
        ("sparse_threshold", "threshold", lambda: torch.ops.actshift.sparse_threshold(meta(x), t)),
        ("sparse_linear", "weight_t", lambda: torch.ops.actshift.sparse_linear(meta(x), wt, meta(t), None)),
        ("relu_ffn", "w_gate", lambda: torch.ops.actshift.relu_ffn(meta(x), wg, None, meta(wd), 0, 0.0, None, None, None)),
        ("percentile_scale", "k", lambda: torch.ops.actshift.percentile_scale(meta(x), k, 1, None)),
        ("adascale_stats", "z_perturbed", lambda: torch.ops.actshift.adascale_stats(meta(x), x, 1, 2)),
    ]
    for op, arg, call in cases:
        with pytest.raises(ValueError, match=f"^{op}: .*{arg}"):
            call()
    # All on meta is still the shape-only fake.
    assert torch.ops.actshift.steer(meta(x), meta(v), meta(w), meta(s), None, None).shape == x.shape


# --- item 11: misaligned data pointers -----------------------------------------------------------


def odd_address(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in foreign memory one byte past an aligned address (torch.frombuffer, which
    keeps the buffer alive; Tensor.view(dtype) would refuse such an offset). Empty t is kept."""
    if t.numel() == 0:
        return t
    out = torch.frombuffer(bytearray(t.numel() * t.element_size() + 1), dtype=t.dtype, offset=1,
                           count=t.numel()).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % t.element_size() != 0
    return out


def same(a, b) -> None:
    """Bit-equal results (NaN where NaN): misalignment must change nothing."""
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(u.view(torch.uint8) if u.dtype == torch.bfloat16 else u,
                           v.view(torch.uint8) if v.dtype == torch.bfloat16 else v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_misaligned_inputs_and_outputs(dtype):
    """Every cpu op on foreign memory at odd addresses gives exactly its result on aligned copies."""
    require_backend("cpu", "cpu")
    x = torch.randn(3, D).to(dtype)
    xm = odd_address(x)
    slot, gate = torch.tensor([0, 1, -1]), torch.tensor([1.0, 0.5, 1.0])
    for plans, kw in ((additive_bank(), {}), (program_bank(), dict(return_monitors=True))):
        want = actshift.steer(x, plans, slot=slot, gate=gate, backend="cpu", **kw)
        same(actshift.steer(xm, plans, slot=odd_address(slot), gate=odd_address(gate), backend="cpu", **kw), want)
        inplace = odd_address(x)
        actshift.steer(inplace, plans, slot=slot, gate=gate, out=inplace, backend="cpu")
        same(inplace, want[0] if kw else want)
    t = torch.rand(D) * 0.5
    same(actshift.sparse_threshold(xm, odd_address(t), backend="cpu"), actshift.sparse_threshold(x, t, backend="cpu"))
    wt, b = torch.randn(D, 8).to(dtype), torch.randn(8).to(dtype)
    same(actshift.sparse_linear(xm, odd_address(wt), 0.5, odd_address(b), backend="cpu"),
         actshift.sparse_linear(x, wt, 0.5, b, backend="cpu"))
    wg, wu, wd = (torch.randn(32, D).to(dtype) for _ in range(3))
    same(actshift.relu_ffn(xm, odd_address(wg), odd_address(wu), odd_address(wd), backend="cpu"),
         actshift.relu_ffn(x, wg, wu, wd, backend="cpu"))
    for method in ("scale", "ash_p"):
        same(actshift.percentile_scale(xm, 60, method, backend="cpu"), actshift.percentile_scale(x, 60, method, backend="cpu"))
    same(actshift.adascale_stats(xm, odd_address(x + 1), 3, 5, backend="cpu"),
         actshift.adascale_stats(x, x + 1, 3, 5, backend="cpu"))


@pytest.mark.parametrize("dtype", dtypes_for("cpu", "cpu"))
def test_misaligned_raw_bank(dtype):
    """The raw ops' bank tensors may be foreign memory too."""
    require_backend("cpu", "cpu")
    x = torch.randn(2, D).to(dtype)
    v, w, s = SteeringBank(additive_bank()).tensors(x.device)
    slot = torch.tensor([1, 0])
    same(torch.ops.actshift.steer(x, odd_address(v), odd_address(w), odd_address(s), None, slot),
         torch.ops.actshift.steer(x, v, w, s, None, slot))
    prog = SteeringBank(program_bank()).program(x.device, folded=True)
    same(torch.ops.actshift.steer_program(x, *(odd_address(p) for p in prog), None, slot, None),
         torch.ops.actshift.steer_program(x, *prog, None, slot, None))
