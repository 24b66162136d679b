"""The steer op (additive part): reference facts, every backend against the reference, out/in-place,
custom-op machinery (opcheck, torch.compile), and bad inputs."""
import importlib
import math

import pytest
import torch
from conftest import assert_close, device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference


def bank(S, m, d, device="cpu"):
    vectors = torch.randn(S, m, d, device=device)
    weights = torch.randn(S, m, device=device)
    strength = torch.rand(S, device=device) * 4 - 2
    return vectors, weights, strength


def expected(x, vectors, weights, strength, gate=None, slot=None):
    """The fp32 reference on the fp32 upcast of x (what every dtype is compared against)."""
    return reference.steer(x.float(), vectors, weights, strength, gate, slot)


# --- the reference against independent facts -------------------------------------------------


def test_reference_single_vector_is_x_plus_lambda_v():
    x, v = torch.randn(3, 16), torch.randn(16)
    y = actshift.steer(x, actshift.SteeringPlan(add=v, strength=2.5), backend="reference")
    torch.testing.assert_close(y, x + 2.5 * v)


def test_reference_weights_gate_and_slot_by_hand():
    x = torch.randn(4, 8)
    v0, v1, u = torch.randn(8), torch.randn(8), torch.randn(8)
    plans = [actshift.SteeringPlan(add=torch.stack([v0, v1]), weights=[2.0, -1.0], strength=0.5),
             actshift.SteeringPlan(add=u, strength=3.0)]
    gate = torch.tensor([1.0, 0.25, 0.0, 1.0])
    slot = torch.tensor([0, 1, 1, -1])
    y = actshift.steer(x, plans, slot=slot, gate=gate, backend="reference")
    torch.testing.assert_close(y[0], x[0] + 0.5 * (2 * v0 - v1))
    torch.testing.assert_close(y[1], x[1] + 3.0 * 0.25 * u)
    assert torch.equal(y[2], x[2])  # gate 0
    assert torch.equal(y[3], x[3])  # slot -1


# --- every backend against the reference --------------------------------------------------------

SHAPES = [(1, 1), (1, 7), (5, 33), (8, 128), (3, 4097), (2, 3, 64)]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, shape):
    require_backend(backend, device)
    d = shape[-1]
    rows = math.prod(shape[:-1])
    vectors, weights, strength = bank(3, 2, d, device)
    gate = torch.rand(shape[:-1], device=device)
    slot = torch.randint(-1, 3, shape[:-1], device=device)
    for dtype in dtypes_for(backend, device):
        x = torch.randn(shape, device=device).to(dtype)
        y = actshift.apply_steer(x, vectors, weights, strength, gate=gate, slot=slot, backend=backend)
        assert y.shape == x.shape and y.dtype == dtype
        ref = expected(x.reshape(rows, d), vectors, weights, strength, gate.reshape(-1), slot.reshape(-1))
        assert_close(y.reshape(rows, d), ref, dtype)
        untouched = slot.reshape(-1) < 0
        assert torch.equal(y.reshape(rows, d)[untouched], x.reshape(rows, d)[untouched])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_no_gate_no_slot_many_vectors(device, backend):
    require_backend(backend, device)
    x = torch.randn(6, 300, device=device)
    for m in (0, 1, 5, 16):
        vectors, weights, strength = bank(1, m, 300, device)
        y = actshift.apply_steer(x, vectors, weights, strength, backend=backend)
        assert_close(y, expected(x, vectors, weights, strength), torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_zero_rows_and_int32_slot_and_strided_rows(device, backend):
    require_backend(backend, device)
    vectors, weights, strength = bank(2, 1, 40, device)
    empty = torch.empty(0, 40, device=device)
    y = actshift.apply_steer(empty, vectors, weights, strength, slot=torch.empty(0, dtype=torch.int32, device=device), backend=backend)
    assert y.shape == (0, 40)
    big = torch.randn(5, 64, device=device)
    x = big[:, :40]  # row stride 64 > d
    slot = torch.tensor([1, 0, -1, 1, 0], dtype=torch.int32, device=device)
    y = actshift.apply_steer(x, vectors, weights, strength, slot=slot, backend=backend)
    assert_close(y, expected(x, vectors, weights, strength, None, slot), torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_out_and_in_place(device, backend):
    require_backend(backend, device)
    plan = actshift.SteeringPlan(add=torch.randn(2, 96), weights=[1.0, -0.5], strength=1.5)
    x = torch.randn(2, 4, 96, device=device)
    ref = actshift.steer(x, plan, backend="reference")
    out = torch.empty_like(x)
    assert actshift.steer(x, plan, out=out, backend=backend) is out
    assert_close(out, ref, torch.float32)
    x_copy = x.clone()
    assert actshift.steer(x_copy, plan, out=x_copy, backend=backend) is x_copy
    assert_close(x_copy, ref, torch.float32)
    # In place with untouched rows (not written at all) and steered ones.
    bank = [plan, actshift.SteeringPlan(add=torch.randn(96))]
    slot = torch.tensor([[0, -1, 1, -1], [1, 1, -1, 0]], device=device)
    ref = actshift.steer(x, bank, slot=slot, backend="reference")
    x_copy = x.clone()
    actshift.steer(x_copy, bank, slot=slot, out=x_copy, backend=backend)
    assert_close(x_copy, ref, torch.float32)
    assert torch.equal(x_copy[slot < 0], x[slot < 0])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 9),
    d=st.integers(1, 300),
    S=st.integers(1, 4),
    m=st.integers(0, 4),
    use_gate=st.booleans(),
    use_slot=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, d, S, m, use_gate, use_slot, dtype, seed):
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g).to(dtype)
    vectors, weights = torch.randn(S, m, d, generator=g), torch.randn(S, m, generator=g)
    strength = torch.randn(S, generator=g)
    gate = torch.rand(rows, generator=g) if use_gate else None
    slot = torch.randint(-1, S, (rows,), generator=g) if use_slot else None
    y = actshift.apply_steer(x, vectors, weights, strength, gate=gate, slot=slot, backend=backend)
    assert_close(y, expected(x, vectors, weights, strength, gate, slot), dtype)


def test_cpu_bf16_large_rows_parallel():
    """Many rows and a long d exercise the threaded tiles and the bf16 rounding path."""
    require_backend("cpu", "cpu")
    vectors, weights, strength = bank(4, 3, 5000)
    x = torch.randn(257, 5000).to(torch.bfloat16)
    slot = torch.randint(-1, 4, (257,))
    gate = torch.rand(257)
    y = actshift.apply_steer(x, vectors, weights, strength, gate=gate, slot=slot, backend="cpu")
    assert_close(y, expected(x, vectors, weights, strength, gate, slot), torch.bfloat16)


# --- custom-op machinery --------------------------------------------------------------------------


def _op_args(device="cpu"):
    vectors, weights, strength = bank(3, 2, 32, device)
    x = torch.randn(6, 32, device=device)
    return x, vectors, weights, strength, torch.rand(6, device=device), torch.tensor([0, 2, -1, 1, 0, 2], device=device)


def test_opcheck_cpu_ops():
    require_backend("cpu", "cpu")
    args = _op_args()
    torch.library.opcheck(torch.ops.actshift.steer.default, args)
    torch.library.opcheck(torch.ops.actshift.steer.default, args[:4] + (None, None))
    torch.library.opcheck(torch.ops.actshift.steer_out.default, args + (torch.empty(6, 32),))


@pytest.mark.triton
def test_opcheck_triton_ops():
    require_backend("triton", "cpu")
    importlib.import_module("actshift.ops.steer")._triton_ready()  # registers the Triton ops
    args = _op_args()
    torch.library.opcheck(torch.ops.actshift.steer_triton.default, args)
    torch.library.opcheck(torch.ops.actshift.steer_triton_out.default, args + (torch.empty(6, 32), False))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    plan = actshift.SteeringPlan(add=torch.randn(2, 64), weights=[0.5, 2.0], strength=1.25)
    x, gate, slot = torch.randn(2, 3, 64), torch.rand(2, 3), torch.randint(-1, 1, (2, 3))

    def f(x, gate, slot):
        return actshift.steer(x * 2, plan, gate=gate, slot=slot, backend=backend) + 1

    compiled = torch.compile(f, fullgraph=True)
    assert_close(compiled(x, gate, slot), f(x, gate, slot), torch.float32)


# --- bad input ------------------------------------------------------------------------------------


def test_plan_rejects_bad_vectors():
    with pytest.raises(ValueError, match="add"):
        actshift.SteeringPlan(add=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="add"):
        actshift.SteeringPlan(add=torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TypeError, match="add"):
        actshift.SteeringPlan(add=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="weights"):
        actshift.SteeringPlan(add=torch.randn(2, 4), weights=[1.0])
    with pytest.raises(ValueError, match="strength"):
        actshift.SteeringPlan(add=torch.randn(4), strength=float("inf"))
    with pytest.raises(ValueError, match="add"):
        actshift.SteeringPlan(add=torch.randn(17, 4))
    with pytest.raises(ValueError, match="hidden size"):
        actshift.SteeringBank([actshift.SteeringPlan(add=torch.randn(4)), actshift.SteeringPlan(add=torch.randn(5))])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cpu")
    plan = actshift.SteeringPlan(add=torch.randn(8))
    two = [plan, actshift.SteeringPlan(add=torch.randn(8))]
    x = torch.randn(3, 8)
    cases = [
        (TypeError, "x", dict(x=x.int())),
        (TypeError, "x", dict(x=x.double())),
        (ValueError, "hidden size", dict(x=torch.randn(3, 9))),
        (ValueError, "gate", dict(gate=torch.rand(4))),
        (TypeError, "gate", dict(gate=torch.ones(3, dtype=torch.long))),
        (ValueError, "slot", dict(slot=torch.zeros(2, dtype=torch.long))),
        (TypeError, "slot", dict(slot=torch.zeros(3))),
        (ValueError, "slot", dict(slot=torch.tensor([0, 1, 0]))),  # one plan: slot 1 is out of range
        (ValueError, "slot", dict(plan=two)),  # a bank needs slots
        (ValueError, "out", dict(out=torch.empty(3, 9))),
        (TypeError, "plan", dict(plan="add")),
    ]
    for exc, word, kw in cases:
        args = dict(x=x, plan=plan) | kw
        xx, pp = args.pop("x"), args.pop("plan")
        with pytest.raises(exc, match=word):
            actshift.steer(xx, pp, backend=backend, **args)
    with pytest.raises(ValueError, match="slot"):
        actshift.steer(x, two, slot=torch.tensor([0, 2, -1]), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unchecked_out_of_range_slot_leaves_row_untouched(backend):
    require_backend(backend, "cpu")
    x = torch.randn(3, 8)
    v, w, s = bank(2, 1, 8)
    slot = torch.tensor([0, 2, 7])
    y = actshift.apply_steer(x, v, w, s, slot=slot, backend=backend, check_slots=False)
    assert torch.equal(y[1:], x[1:])
    assert_close(y[0], x[0] + s[0] * w[0, 0] * v[0, 0], torch.float32)


def test_raw_bank_checks():
    x = torch.randn(2, 8)
    v, w, s = bank(1, 1, 8)
    with pytest.raises(ValueError, match="finite"):
        actshift.apply_steer(x, v * float("nan"), w, s)
    with pytest.raises(TypeError, match="vectors"):
        actshift.apply_steer(x, v.half(), w, s)
    with pytest.raises(ValueError, match="vectors"):
        actshift.apply_steer(x, torch.randn(1, 1, 9), w, s)
    with pytest.raises(ValueError, match="weights"):
        actshift.apply_steer(x, v, torch.randn(1, 2), s)
    with pytest.raises(ValueError, match="vectors"):
        actshift.apply_steer(x, torch.randn(1, 17, 8), torch.randn(1, 17), s)


def test_cpp_op_checks_direct_calls():
    """Direct torch.ops calls (no Python wrapper) still fail clearly, never read out of bounds."""
    require_backend("cpu", "cpu")
    x, v, w, s, g, slot = _op_args()
    with pytest.raises(ValueError, match="slot"):
        torch.ops.actshift.steer(x, v, w, s, g, torch.tensor([0, 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="vectors"):
        torch.ops.actshift.steer(x, v[:, :, :16].contiguous(), w, s, g, slot)
    with pytest.raises(TypeError, match="x"):
        torch.ops.actshift.steer(x.double(), v, w, s, g, slot)
    with pytest.raises(ValueError, match="gate"):
        torch.ops.actshift.steer(x, v, w, s, g[:3], slot)
    with pytest.raises(ValueError, match="overlaps"):
        torch.ops.actshift.steer_out(x[:4], v, w, s, None, None, x[2:])


@pytest.mark.cuda
def test_device_mismatch_is_a_clear_error():
    plan = actshift.SteeringPlan(add=torch.randn(8))
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="gate"):
        actshift.steer(x, plan, gate=torch.rand(3))


# --- GPU only (run wherever a CUDA GPU is present) ---------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_and_compile(backend):
    require_backend(backend, "cuda")
    importlib.import_module("actshift.ops.steer")._triton_ready()
    op, op_out = {
        "cuda": (torch.ops.actshift.steer.default, torch.ops.actshift.steer_out.default),
        "triton": (torch.ops.actshift.steer_triton.default, torch.ops.actshift.steer_triton_out.default),
    }[backend]
    args = _op_args("cuda")
    torch.library.opcheck(op, args)
    out_args = args + (torch.empty(6, 32, device="cuda"),) + ((False,) if backend == "triton" else ())
    torch.library.opcheck(op_out, out_args)
    torch._dynamo.reset()
    plan = actshift.SteeringPlan(add=torch.randn(64))
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda x: actshift.steer(x, plan, backend=backend), fullgraph=True)
    assert_close(f(x), expected(x, *actshift.SteeringBank([plan]).tensors(x.device)), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(backend):
    """A captured steer replays with new inputs and slots written into the static buffers."""
    require_backend(backend, "cuda")
    bank = actshift.SteeringBank([actshift.SteeringPlan(add=torch.randn(256)), actshift.SteeringPlan(add=torch.randn(256))])
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    slot = torch.zeros(8, dtype=torch.long, device="cuda")
    out = torch.empty_like(x)
    actshift.steer(x, bank, slot=slot, out=out, backend=backend)  # warm-up (compiles Triton)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        actshift.steer(x, bank, slot=slot, out=out, backend=backend)
    x.copy_(torch.randn_like(x))
    slot.copy_(torch.tensor([0, 1, -1, 1, 0, -1, 1, 0], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, expected(x, *bank.tensors(x.device), None, slot), torch.float16)
