"""The full steering program (ablate/clamp, affine, add, neurons, condition, monitors, renorm, banks):
the reference against hand-computed facts, every backend against the reference, in place, custom-op
machinery (opcheck, torch.compile), banks of many mixed plans, and bad inputs."""
import math

import pytest
import torch
from conftest import assert_close, device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference
from actshift.steering import SteeringBank, SteeringPlan


def unit(d, gen=None):
    v = torch.randn(d, generator=gen)
    return v / v.norm()


def orthonormal(k, d, gen=None):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.t().float().contiguous()


def ref(x, plan, **kw):
    return actshift.steer(x, plan, backend="reference", **kw)


# --- the reference against independent facts -------------------------------------------------


def test_ablation_removes_the_component():
    x, u = torch.randn(5, 32), unit(32)
    y = ref(x, SteeringPlan().ablate(u))
    torch.testing.assert_close(y @ u, torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, x - (x @ u)[:, None] * u)


def test_clamp_sets_the_projections_to_the_targets():
    x, U = torch.randn(6, 48), orthonormal(3, 48)
    t = torch.tensor([1.5, -2.0, 0.25])
    y = ref(x, SteeringPlan().ablate(U, targets=t))
    torch.testing.assert_close(y @ U.t(), t.expand(6, 3), atol=1e-5, rtol=1e-5)
    # The part orthogonal to span(U) is unchanged.
    P = torch.eye(48) - U.t() @ U
    torch.testing.assert_close(y @ P, x @ P, atol=1e-5, rtol=1e-5)


def test_orthonormalize_and_strength_interpolates():
    x = torch.randn(4, 16)
    raw = torch.randn(2, 16)
    with pytest.raises(ValueError, match="orthonormal"):
        SteeringPlan().ablate(raw)
    plan = SteeringPlan(strength=0.5).ablate(raw, orthonormalize=True)
    U = plan.directions
    torch.testing.assert_close(U @ U.t(), torch.eye(2), atol=1e-5, rtol=0)
    # The first direction keeps its orientation (Gram-Schmidt in row order).
    assert float(U[0] @ raw[0]) > 0 and torch.allclose(U[0], raw[0] / raw[0].norm(), atol=1e-6)
    y = ref(x, plan)
    # Half strength removes half of the component in span(U).
    torch.testing.assert_close(y @ U.t(), 0.5 * (x @ U.t()), atol=1e-5, rtol=1e-5)


def test_affine_add_neurons_in_order():
    d = 24
    x = torch.randn(3, d)
    u, s, b, v = unit(d), torch.rand(d) + 0.5, torch.randn(d), torch.randn(d)
    idx = torch.tensor([0, 7, 23])
    plan = (SteeringPlan(add=v, strength=1.0).ablate(u).affine(s, b).neurons(idx, mul=torch.tensor([2.0, 0.0, -1.0]), add=3.0))
    z = x - (x @ u)[:, None] * u
    z = s * z + b
    z = z + v
    z[:, idx] = torch.tensor([2.0, 0.0, -1.0]) * z[:, idx] + 3.0
    torch.testing.assert_close(ref(x, plan), z)
    # Strength λ interpolates between x and the program.
    torch.testing.assert_close(ref(x, SteeringPlan(add=v, strength=0.3).affine(s, b)), x + 0.3 * (s * x + b + v - x))


def test_neurons_alone_touch_only_their_indices():
    x = torch.randn(4, 10)
    y = ref(x, SteeringPlan().neurons([2, 5], mul=0.0, add=torch.tensor([1.0, -1.0])).monitor(torch.randn(10)))
    keep = [i for i in range(10) if i not in (2, 5)]
    assert torch.equal(y[:, keep], x[:, keep])
    torch.testing.assert_close(y[:, 2], torch.ones(4))
    torch.testing.assert_close(y[:, 5], -torch.ones(4))


def test_renorm_preserves_the_norm():
    x, v = torch.randn(7, 64), 3 * torch.randn(64)
    y = ref(x, SteeringPlan(add=v, strength=2.0, renorm=True))
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    # and keeps the direction of the unnormalized result
    raw = x + 2.0 * v
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), raw / raw.norm(dim=1, keepdim=True))


def test_monitors_equal_x_dot_M_on_the_input():
    x, M, v = torch.randn(2, 3, 40), torch.randn(4, 40), torch.randn(40)
    y, mon = ref(x, SteeringPlan(add=v).monitor(M), return_monitors=True)
    assert mon.shape == (2, 3, 4) and mon.dtype == torch.float32
    torch.testing.assert_close(mon, x @ M.t())
    torch.testing.assert_close(y, x + v)


def test_condition_gates_rows():
    d = 32
    c = unit(d)
    ortho = unit(d)
    ortho = ortho - (ortho @ c) * c
    ortho = ortho / ortho.norm()
    cos = torch.tensor([0.9, 0.1, 0.5, -0.7])
    x = (cos[:, None] * c + (1 - cos[:, None] ** 2).sqrt() * ortho) * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None]
    v = torch.randn(d)
    y = ref(x, SteeringPlan(add=v).condition(3 * c, threshold=0.3))  # cosine ignores |c|
    hit = cos > 0.3
    torch.testing.assert_close(y[hit], x[hit] + v)
    assert torch.equal(y[~hit], x[~hit])
    # projection with "<": x·c < 0.25 (projections 0.9, 0.2, 1.5, -0.35)
    proj = x @ c
    y = ref(x, SteeringPlan(add=v).condition(c, threshold=0.25, kind="projection", compare="<"))
    hit = proj < 0.25
    assert hit.any() and (~hit).any()
    torch.testing.assert_close(y[hit], x[hit] + v)
    assert torch.equal(y[~hit], x[~hit])


def test_gate_mask_and_per_row_weights():
    x, V = torch.randn(4, 16), torch.randn(2, 16)
    plan = SteeringPlan(add=V, weights=[1.0, 1.0], strength=2.0).monitor(torch.randn(16))
    gate = torch.tensor([1.0, 0.5, 1.0, 1.0])
    mask = torch.tensor([True, True, False, True])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
    y = ref(x, plan, gate=gate, mask=mask, weights=w)
    expect = x + 2.0 * (gate * mask)[:, None] * (w @ V)
    torch.testing.assert_close(y, expect)
    assert torch.equal(y[2], x[2])


def test_slot_minus_one_is_bit_exact_and_monitors_zero():
    d = 20
    plans = [SteeringPlan(add=torch.randn(d)).ablate(unit(d)).monitor(torch.randn(2, d)),
             SteeringPlan(renorm=True).affine(torch.rand(d), torch.randn(d))]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, d).to(dtype)
        slot = torch.tensor([0, -1, 1, -1, 0])
        y, mon = ref(x, plans, slot=slot, return_monitors=True)
        assert torch.equal(y[slot < 0], x[slot < 0])
        assert torch.equal(mon[slot < 0], torch.zeros(2, 2))
        torch.testing.assert_close(mon[slot == 0], x[slot == 0].float() @ plans[0].monitors.t())
        assert torch.equal(mon[2], torch.zeros(2))  # plan 1 has no monitors: padded with 0


def test_mixed_bank_equals_each_plan_alone():
    d = 16
    plans = [SteeringPlan(add=torch.randn(2, d), weights=[0.5, -1.0], strength=1.5),
             SteeringPlan().ablate(orthonormal(2, d), targets=[0.5, 0.0]).monitor(torch.randn(3, d)),
             SteeringPlan(add=torch.randn(d), renorm=True).condition(torch.randn(d), -0.1),
             SteeringPlan().neurons([1, 3], 2.0, 1.0).affine(bias=torch.randn(d))]
    x = torch.randn(12, d)
    slot = torch.arange(12) % 5 - 1
    y, mon = ref(x, plans, slot=slot, return_monitors=True)
    for s, p in enumerate(plans):
        rows = slot == s
        ys, ms = ref(x[rows], p, return_monitors=True)
        torch.testing.assert_close(y[rows], ys)
        torch.testing.assert_close(mon[rows, : ms.shape[1]], ms)


# --- plan validation ------------------------------------------------------------------------------


def test_plan_validation_names_the_argument():
    d = 8
    cases = [
        (ValueError, "directions", lambda: SteeringPlan().ablate(torch.randn(17, d))),
        (ValueError, "targets", lambda: SteeringPlan().ablate(unit(d), targets=[1.0, 2.0])),
        (ValueError, "directions", lambda: SteeringPlan().ablate(torch.tensor([1.0, float("nan")]))),
        (ValueError, "linearly dependent", lambda: SteeringPlan().ablate(torch.stack([unit(d)] * 2), orthonormalize=True)),
        (ValueError, "hidden size", lambda: SteeringPlan(add=torch.randn(d)).ablate(unit(d + 1))),
        (ValueError, "affine", lambda: SteeringPlan().affine()),
        (ValueError, "scale", lambda: SteeringPlan().affine(torch.randn(2, d))),
        (ValueError, "idx", lambda: SteeringPlan().neurons([])),
        (ValueError, "idx", lambda: SteeringPlan().neurons([1, 1])),
        (ValueError, "idx", lambda: SteeringPlan().neurons([-1])),
        (ValueError, "idx", lambda: SteeringPlan(add=torch.randn(d)).neurons([d])),
        (TypeError, "idx", lambda: SteeringPlan().neurons([0.5])),
        (ValueError, "mul", lambda: SteeringPlan().neurons([1, 2], mul=[1.0])),
        (ValueError, "kind", lambda: SteeringPlan().condition(unit(d), kind="dot")),
        (ValueError, "compare", lambda: SteeringPlan().condition(unit(d), compare=">=")),
        (ValueError, "vector", lambda: SteeringPlan().condition(torch.zeros(d))),
        (ValueError, "threshold", lambda: SteeringPlan().condition(unit(d), threshold=float("nan"))),
        (ValueError, "matrix", lambda: SteeringPlan().monitor(torch.randn(17, d))),
        (TypeError, "renorm", lambda: SteeringPlan(renorm=1)),
        (ValueError, "hidden size", lambda: SteeringBank([SteeringPlan().neurons([3])])),
        (ValueError, "neuron index", lambda: SteeringBank([SteeringPlan().neurons([9]), SteeringPlan(add=torch.randn(d))])),
    ]
    for exc, word, make in cases:
        with pytest.raises(exc, match=word):
            make()


def test_builders_return_new_plans():
    base = SteeringPlan(add=torch.randn(8))
    ablated = base.ablate(unit(8))
    assert base.directions is None and ablated.directions is not None
    assert base.is_additive and not ablated.is_additive


# --- every backend against the reference --------------------------------------------------------


def full_plans(d, gen=None):
    """Plans exercising every part, alone and together (the bank mixes them); the CPU kernel's
    fused path (k, m <= 2, no renorm) and its general path both occur."""
    g = gen
    return [
        SteeringPlan(add=torch.randn(2, d, generator=g), weights=[1.0, -0.5], strength=1.5)
        .ablate(orthonormal(min(2, d), d, g), targets=[0.3, -0.2][: min(2, d)]).monitor(torch.randn(2, d, generator=g)),
        SteeringPlan(strength=0.7, renorm=True).affine(torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g)),
        SteeringPlan(add=torch.randn(d, generator=g)).condition(torch.randn(d, generator=g), threshold=0.0)
        .neurons(torch.randperm(d, generator=g)[: max(1, d // 3)], mul=2.0, add=-1.0),
        SteeringPlan(add=torch.randn(3, d, generator=g), strength=-1.0, renorm=True)
        .condition(torch.randn(d, generator=g), threshold=0.5, kind="projection", compare="<")
        .monitor(torch.randn(d, generator=g)),
        SteeringPlan(add=torch.randn(d, generator=g)),
        # More than 2 directions: the CPU kernel's general (pass-by-pass) path, with neurons.
        SteeringPlan(strength=0.8).ablate(orthonormal(min(3, d), d, g)).affine(scale=torch.rand(d, generator=g))
        .neurons(torch.randperm(d, generator=g)[: max(1, d // 2)], mul=torch.linspace(-1, 1, max(1, d // 2)), add=0.5),
    ]


def program_ref(x, bank, gate=None, slot=None, row_weights=None):
    """The fp32 reference on the fp32 upcast of x."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    prog = bank.program(x.device, folded=row_weights is None)
    flat = lambda t: None if t is None else t.reshape(-1, *t.shape[x.dim() - 1:])  # noqa: E731
    return reference.steer_program(x2, *prog, flat(gate), flat(slot), None if row_weights is None else row_weights.reshape(-1, row_weights.shape[-1]).float())


SHAPES = [(1, 1), (1, 7), (5, 33), (8, 128), (3, 4097), (2, 3, 64)]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, shape):
    require_backend(backend, device)
    d = shape[-1]
    bank = SteeringBank(full_plans(d))
    gate = torch.rand(shape[:-1], device=device)
    slot = torch.randint(-1, len(bank), shape[:-1], device=device)
    for dtype in dtypes_for(backend, device):
        x = torch.randn(shape, device=device).to(dtype)
        y, mon = actshift.steer(x, bank, slot=slot, gate=gate, return_monitors=True, backend=backend)
        assert y.shape == x.shape and y.dtype == dtype and mon.shape == (*shape[:-1], 2)
        ey, emon = program_ref(x, bank, gate, slot)
        assert_close(y.reshape(ey.shape), ey, dtype)
        torch.testing.assert_close(mon.reshape(emon.shape), emon, rtol=1e-4, atol=1e-4)
        untouched = slot.reshape(-1) < 0
        assert torch.equal(y.reshape(-1, d)[untouched], x.reshape(-1, d)[untouched])


def max_plans(d, gen=None):
    """Every part at its largest count (16 ablation directions with targets, 16 add vectors,
    16 monitors, every neuron), with each condition kind and renorm."""
    g = gen
    full = lambda: (SteeringPlan(add=torch.randn(16, d, generator=g), weights=torch.linspace(-1, 1, 16),  # noqa: E731
                                 strength=0.9)
                    .ablate(orthonormal(16, d, g), targets=torch.linspace(-0.5, 0.5, 16))
                    .affine(torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g))
                    .neurons(torch.randperm(d, generator=g), mul=torch.linspace(-2, 2, d), add=0.25)
                    .monitor(torch.randn(16, d, generator=g)))
    return [full().condition(torch.randn(d, generator=g), threshold=-0.5),
            full().condition(torch.randn(d, generator=g), threshold=1.0, kind="projection", compare="<"),
            SteeringPlan(add=torch.randn(16, d, generator=g), strength=0.5, renorm=True)
            .ablate(orthonormal(16, d, g)).monitor(torch.randn(16, d, generator=g))]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("d", [16, 17, 127])
def test_max_counts_of_every_part(device, backend, d):
    """The largest plan at small and odd hidden sizes: more read-outs (2 + 16 monitors + 16 ablation
    dots) than a one-warp CUDA block has threads, every neuron edited, 16 vectors. (Per-row
    weights in fp32 only: each combination is another Triton compile on a GPU.)"""
    require_backend(backend, device)
    bank = SteeringBank(max_plans(d))
    rows = 7
    slot = torch.tensor([0, 1, 2, -1, 2, 1, 0], device=device)
    gate = torch.rand(rows, device=device) + 0.5
    w = torch.randn(rows, 16, device=device)
    for dtype in dtypes_for(backend, device):
        x = torch.randn(rows, d, device=device).to(dtype)
        for row_weights in (None, w) if dtype == torch.float32 else (None,):
            y, mon = actshift.steer(x, bank, slot=slot, gate=gate, weights=row_weights, return_monitors=True,
                                    backend=backend)
            ey, emon = program_ref(x, bank, gate, slot, row_weights)
            assert mon.shape == (rows, 16)
            assert_close(y, ey, dtype)
            torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)
    # The additive op with 16 vectors per plan.
    plan = SteeringPlan(add=torch.randn(16, d), weights=torch.linspace(-1, 1, 16), strength=0.7)
    x = torch.randn(rows, d, device=device)
    assert_close(actshift.steer(x, plan, backend=backend), ref(x, plan), torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_per_row_weights_and_no_slot(device, backend):
    require_backend(backend, device)
    d = 96
    plans = full_plans(d)
    x = torch.randn(6, d, device=device)
    w = torch.randn(6, 3, device=device)
    bank = SteeringBank(plans)
    slot = torch.tensor([0, 3, 4, -1, 2, 1], device=device)
    y = actshift.steer(x, bank, slot=slot, weights=w, backend=backend)
    assert_close(y, program_ref(x, bank, None, slot, w)[0], torch.float32)
    # One plan, no slot: every row steered.
    y = actshift.steer(x, plans[0], backend=backend)
    assert_close(y, program_ref(x, SteeringBank([plans[0]]))[0], torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_out_and_in_place(device, backend):
    require_backend(backend, device)
    d = 80
    bank = SteeringBank(full_plans(d))
    x = torch.randn(2, 5, d, device=device)
    slot = torch.tensor([[0, -1, 1, 2, 3], [4, 3, -1, 0, 1]], device=device)
    ey, emon = actshift.steer(x, bank, slot=slot, return_monitors=True, backend="reference")
    out = torch.empty_like(x)
    got, mon = actshift.steer(x, bank, slot=slot, out=out, return_monitors=True, backend=backend)
    assert got is out
    assert_close(out, ey, torch.float32)
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)
    x2 = x.clone()
    got, mon = actshift.steer(x2, bank, slot=slot, out=x2, return_monitors=True, backend=backend)
    assert got is x2
    assert_close(x2, ey, torch.float32)
    assert torch.equal(x2[slot < 0], x[slot < 0])
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 9),
    d=st.integers(1, 300),
    use_gate=st.booleans(),
    use_slot=st.booleans(),
    use_weights=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, d, use_gate, use_slot, use_weights, dtype, seed):
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    g = torch.Generator().manual_seed(seed)
    plans = full_plans(d, g)
    bank = SteeringBank(plans if use_slot else plans[:1])
    x = torch.randn(rows, d, generator=g).to(dtype)
    gate = torch.rand(rows, generator=g) if use_gate else None
    slot = torch.randint(-1, len(plans), (rows,), generator=g) if use_slot else None
    w = torch.randn(rows, bank.max_vectors, generator=g) if use_weights else None
    y, mon = actshift.steer(x, bank, slot=slot, gate=gate, weights=w, return_monitors=True, backend=backend)
    ey, emon = program_ref(x, bank, gate, slot, w)
    # Scores are continuous random draws, so none lies within round-off of a threshold (where the
    # kernel's and the reference's dot products could decide a row differently).
    assert_close(y, ey, dtype)
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)


def test_bank_of_256_mixed_plans():
    require_backend("cpu", "cpu")
    d = 64
    gen = torch.Generator().manual_seed(1)
    pool = full_plans(d, gen)
    plans = [pool[i % len(pool)] if i % 7 else SteeringPlan(add=torch.randn(d, generator=gen), strength=i / 256) for i in range(300)]
    bank = SteeringBank(plans)
    x = torch.randn(1024, d)
    slot = torch.randint(-1, 300, (1024,))
    y, mon = actshift.steer(x, bank, slot=slot, return_monitors=True, backend="cpu")
    ey, emon = program_ref(x, bank, None, slot)
    assert_close(y, ey, torch.float32)
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)
    assert bank.program(x.device) is bank.program(x.device)  # built once, cached


def test_cpu_bf16_large_rows_parallel():
    require_backend("cpu", "cpu")
    d = 5000
    bank = SteeringBank(full_plans(d))
    x = torch.randn(257, d).to(torch.bfloat16)
    slot = torch.randint(-1, len(bank), (257,))
    gate = torch.rand(257)
    y = actshift.steer(x, bank, slot=slot, gate=gate, backend="cpu")
    assert_close(y, program_ref(x, bank, gate, slot)[0], torch.bfloat16)


def test_additive_plans_keep_the_additive_op_and_agree():
    """An additive-only bank runs the plain op; forcing the program path gives the same result."""
    require_backend("cpu", "cpu")
    plan = SteeringPlan(add=torch.randn(2, 32), weights=[0.5, 1.0], strength=2.0)
    x = torch.randn(4, 32)
    y_add = actshift.steer(x, plan, backend="cpu")
    y_prog, mon = actshift.steer(x, plan, return_monitors=True, backend="cpu")
    assert mon.shape == (4, 0)
    assert_close(y_prog, y_add, torch.float32)


# --- custom-op machinery --------------------------------------------------------------------------


def _op_args(d=32, rows=6):
    bank = SteeringBank(full_plans(d))
    prog = tuple(bank.program(torch.device("cpu")))
    x = torch.randn(rows, d)
    return x, prog, torch.rand(rows), torch.tensor([0, 2, -1, 1, 3, 4])[:rows]


def test_opcheck_cpu_ops():
    require_backend("cpu", "cpu")
    x, prog, gate, slot = _op_args()
    torch.library.opcheck(torch.ops.actshift.steer_program.default, (x, *prog, gate, slot, None))
    torch.library.opcheck(torch.ops.actshift.steer_program.default, (x, *prog, None, None, None))
    bank = SteeringBank(full_plans(32))
    unfolded = tuple(bank.program(torch.device("cpu"), folded=False))
    torch.library.opcheck(torch.ops.actshift.steer_program.default, (x, *unfolded, gate, slot, torch.randn(6, 3)))
    torch.library.opcheck(torch.ops.actshift.steer_program_out.default, (x, *prog, gate, slot, None, torch.empty(6, 32)))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    bank = SteeringBank(full_plans(64))
    x, gate, slot = torch.randn(2, 3, 64), torch.rand(2, 3), torch.randint(-1, 5, (2, 3))

    def f(x, gate, slot):
        y, mon = actshift.steer(x * 2, bank, gate=gate, slot=slot, return_monitors=True, backend=backend)
        return y + 1, mon

    compiled = torch.compile(f, fullgraph=True)
    (y, mon), (ey, emon) = compiled(x, gate, slot), f(x, gate, slot)
    assert_close(y, ey, torch.float32)
    torch.testing.assert_close(mon, emon)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cpu")
    plan = SteeringPlan(add=torch.randn(2, 8)).monitor(torch.randn(8))
    two = [plan, SteeringPlan().ablate(unit(8))]
    x = torch.randn(3, 8)
    cases = [
        (TypeError, "x", dict(x=x.int())),
        (ValueError, "hidden size", dict(x=torch.randn(3, 9))),
        (ValueError, "gate", dict(gate=torch.rand(4))),
        (ValueError, "slot", dict(slot=torch.tensor([0, 1, 0]))),
        (ValueError, "slot", dict(plan=two)),
        (ValueError, "weights", dict(weights=torch.randn(3, 3))),
        (ValueError, "weights", dict(weights=torch.tensor([[1.0, float("nan")]] * 3))),
        (TypeError, "weights", dict(weights=torch.ones(3, 2, dtype=torch.long))),
        (ValueError, "weights", dict(plan=SteeringPlan().ablate(unit(8)), weights=torch.randn(3, 1))),
        (ValueError, "mask", dict(mask=torch.ones(4, dtype=torch.bool))),
        (TypeError, "mask", dict(mask=torch.ones(3, dtype=torch.long))),
        (ValueError, "out", dict(out=torch.empty(3, 9))),
    ]
    for exc, word, kw in cases:
        args = dict(x=x, plan=plan) | kw
        xx, pp = args.pop("x"), args.pop("plan")
        with pytest.raises(exc, match=word):
            actshift.steer(xx, pp, backend=backend, return_monitors=True, **args)
    with pytest.raises(ValueError, match="slot"):
        actshift.steer(x, two, slot=torch.tensor([0, 2, -1]), backend=backend)


def test_cpp_op_checks_direct_calls():
    """Direct torch.ops calls fail clearly on bad layouts and bad metadata, never read out of bounds."""
    require_backend("cpu", "cpu")
    x, prog, gate, slot = _op_args()
    op = torch.ops.actshift.steer_program

    def call(**changes):
        names = ["meta", "scalars", "ablate", "targets", "affine", "vectors", "weights", "neuron_idx",
                 "neuron_val", "condition", "monitor"]
        args = dict(zip(names, prog)) | {k: v for k, v in changes.items() if k in names}
        return op(changes.get("x", x), *[args[n] for n in names], changes.get("gate", gate),
                  changes.get("slot", slot), changes.get("row_weights"))

    meta = prog[0]
    bad_count = meta.clone()
    bad_count[0, 1] = 9  # more ablation directions than the bank holds
    bad_flags = meta.clone()
    bad_flags[0, 0] = 1 << 10
    bad_idx = prog[7].clone()
    bad_idx[2, 0] = 32
    dup_idx = prog[7].clone()
    dup_idx[2, 1] = dup_idx[2, 0]
    cases = [
        (TypeError, "x", dict(x=x.double())),
        (ValueError, "slot", dict(slot=torch.tensor([0, 9, 0, 0, 0, 0]))),
        (TypeError, "meta", dict(meta=meta.long())),
        (ValueError, "meta", dict(meta=meta[:, :4].contiguous())),
        (ValueError, "meta", dict(meta=bad_count)),
        (ValueError, "flag", dict(meta=bad_flags)),
        (ValueError, "neuron_idx", dict(neuron_idx=bad_idx)),
        (ValueError, "repeats", dict(neuron_idx=dup_idx)),
        (ValueError, "ablate", dict(ablate=prog[2][:, :, :16].contiguous())),
        (ValueError, "targets", dict(targets=prog[3][:, :1].contiguous())),
        (ValueError, "affine", dict(affine=torch.zeros(5, 1, 32))),
        (ValueError, "monitor", dict(monitor=torch.zeros(5, 17, 32))),
        (ValueError, "row_weights", dict(row_weights=torch.zeros(6, 2))),
        (ValueError, "gate", dict(gate=gate[:3])),
        (ValueError, "condition", dict(condition=torch.zeros(5, 2, 32))),
    ]
    for exc, word, kw in cases:
        with pytest.raises(exc, match=word):
            call(**kw)
    with pytest.raises(ValueError, match="overlaps"):
        torch.ops.actshift.steer_program_out(x[:4], *prog, None, None, None, x[2:])


@pytest.mark.cuda
def test_gpu_program_matches_reference():
    for backend in ("cuda", "triton"):
        require_backend(backend, "cuda")
        bank = SteeringBank(full_plans(512))
        x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
        slot = torch.randint(-1, len(bank), (16,), device="cuda")
        y, mon = actshift.steer(x, bank, slot=slot, return_monitors=True, backend=backend)
        ey, emon = program_ref(x, bank, None, slot)
        assert_close(y, ey, torch.bfloat16)
        torch.testing.assert_close(mon, emon, rtol=1e-2, atol=1e-2)
