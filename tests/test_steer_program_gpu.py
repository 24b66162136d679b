"""The GPU kernels of the full steering program (kernels/steer.py's Triton kernel, csrc/cuda/steer.cu),
beyond the backend-parametrized tests of test_steer_program.py: bad metadata is clamped (never read out
of bounds), untouched rows stay bit-exact even for NaN payloads, rows too long for one program or
block fail clearly, the ops pass opcheck / torch.compile / CUDA graphs, and large banks and rows agree
with the reference. Triton runs on CPU under TRITON_INTERPRET=1 (conftest); the rest is marked cuda."""
import pytest
import torch
from conftest import assert_close, dtypes_for, require_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_steer_program import full_plans, program_ref, unit

import actshift
from actshift import reference
from actshift.steering import SteeringBank, SteeringPlan

PARAMS = [
    pytest.param("cpu", "triton", id="cpu-triton"),
    pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda),
]


def program_op(backend: str):
    """The op that runs the program on `backend`, called as op(x, *prog, gate, slot, row_weights)."""
    return torch.ops.actshift.steer_program_triton if backend == "triton" else torch.ops.actshift.steer_program


def program_out_call(backend: str, x, prog, gate, slot, row_weights, out):
    if backend == "triton":
        return torch.ops.actshift.steer_program_triton_out(x, *prog, gate, slot, row_weights, out, out is x)
    return torch.ops.actshift.steer_program_out(x, *prog, gate, slot, row_weights, out)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_counts_clamped_and_bad_indices_skipped(device, backend):
    """The GPU kernels do not validate metadata values (that would sync): counts above the padded
    sizes read only zero padding, and a neuron index outside [0, d) edits nothing."""
    require_backend(backend, device)
    d = 40
    bank = SteeringBank(full_plans(d))
    prog = [t.clone() for t in bank.program(torch.device(device))]
    x = torch.randn(len(bank), d, device=device)
    slot = torch.arange(len(bank), device=device)
    expect_y, expect_mon = reference.steer_program(x, *prog, None, slot, None)
    meta = prog[0]
    meta[:, 1] = 99  # ablation directions, add vectors, monitors: padding is zero, so no effect
    meta[:, 2] = 99
    meta[:, 4] = 99
    meta[0, 3] = -3  # a negative count is no neuron
    y, mon = program_op(backend)(x, *prog, None, slot, None)
    assert_close(y, expect_y, torch.float32)
    torch.testing.assert_close(mon, expect_mon, rtol=1e-4, atol=1e-4)
    # Plan 2 edits neurons; point its first index past the row and its second below 0.
    idx, val = prog[7], prog[8]
    assert meta[2, 3] >= 1
    bad = idx.clone()
    bad[2, 0] = d + 1000
    y, _ = program_op(backend)(x, *prog[:7], bad, *prog[8:], None, slot, None)
    identity = val.clone()
    identity[2, 0, 0], identity[2, 1, 0] = 1.0, 0.0  # the skipped edit, as an identity edit
    expect_y, _ = reference.steer_program(x, *prog[:8], identity, *prog[9:], None, slot, None)
    assert_close(y, expect_y, torch.float32)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_neurons_with_renorm(device, backend):
    """Neuron edits feed the renorm's ‖y‖ (the GPU kernels handle them apart from the dense row)."""
    require_backend(backend, device)
    for d in (9, 200):
        idx = torch.randperm(d)[: d // 2]
        plan = (SteeringPlan(add=torch.randn(d), strength=0.9, renorm=True).ablate(unit(d))
                .neurons(idx, mul=torch.linspace(-2, 3, idx.numel()), add=torch.randn(idx.numel())))
        x = torch.randn(5, d, device=device)
        expect = program_ref(x, SteeringBank([plan]))[0]
        assert_close(actshift.steer(x, plan, backend=backend), expect, torch.float32)
        x2 = x.clone()
        actshift.steer(x2, plan, out=x2, backend=backend)
        assert_close(x2, expect, torch.float32)
        torch.testing.assert_close(x2.norm(dim=1), x.norm(dim=1))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_untouched_rows_are_bit_exact(device, backend):
    """Rows with slot -1 or a zero gate keep their exact bits (NaN payloads, -0.0), out of place and
    in place; steered rows next to them are correct."""
    require_backend(backend, device)
    d = 64
    bank = SteeringBank(full_plans(d))
    for dtype in dtypes_for(backend, device):
        x = torch.randn(6, d, device=device).to(dtype)
        x[1, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
        x[4, 5] = float("nan")
        bits = x.view(torch.int16 if dtype != torch.float32 else torch.int32)
        bits[1, 0] = bits[1, 0] | 1  # a NaN with a payload
        slot = torch.tensor([0, -1, 1, 4, 2, -1], device=device)
        gate = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0], device=device)
        untouched = torch.tensor([False, True, False, True, False, True], device=device)
        y = actshift.steer(x, bank, slot=slot, gate=gate, backend=backend)
        assert torch.equal(y[untouched].view(bits.dtype), bits[untouched])
        steered = ~untouched & (torch.arange(6, device=device) != 4)  # row 4 holds a NaN
        assert_close(y[steered], program_ref(x, bank, gate, slot)[0][steered], dtype)
        x2 = x.clone()
        actshift.steer(x2, bank, slot=slot, gate=gate, out=x2, backend=backend)
        assert torch.equal(x2.view(bits.dtype)[untouched], bits[untouched])
        assert torch.equal(x2[steered], y[steered])


@pytest.mark.parametrize("device,backend", PARAMS)
def test_rows_too_long_fail_clearly(device, backend):
    require_backend(backend, device)
    # Triton holds a row in one program (<= 16384); CUDA stages it in shared memory (bounded by the
    # device: 2**17 fp32 values twice is 1 MiB, more than any GPU offers a block).
    d = 16385 if backend == "triton" else 1 << 17
    plan = SteeringPlan(add=torch.ones(d)).ablate(unit(d))
    x = torch.randn(2, d, device=device)
    with pytest.raises(ValueError, match="hidden size.*cpu"):
        actshift.steer(x, plan, backend=backend)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_opcheck(device, backend):
    require_backend(backend, device)
    actshift.steer(torch.randn(1, 8, device=device), SteeringPlan().ablate(unit(8)), backend=backend)  # registers
    d, rows = 32, 6
    bank = SteeringBank(full_plans(d))
    dev = torch.device(device)
    prog, unfolded = tuple(bank.program(dev)), tuple(bank.program(dev, folded=False))
    x, gate = torch.randn(rows, d, device=device), torch.rand(rows, device=device)
    slot = torch.tensor([0, 2, -1, 1, 3, 4], device=device)
    op = program_op(backend).default
    torch.library.opcheck(op, (x, *prog, gate, slot, None))
    torch.library.opcheck(op, (x, *prog, None, None, None))
    torch.library.opcheck(op, (x, *unfolded, gate, slot, torch.randn(rows, 3, device=device)))
    out = torch.empty(rows, d, device=device)
    if backend == "triton":
        torch.library.opcheck(torch.ops.actshift.steer_program_triton_out.default,
                              (x, *prog, gate, slot, None, out, False))
    else:
        torch.library.opcheck(torch.ops.actshift.steer_program_out.default, (x, *prog, gate, slot, None, out))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_torch_compile_fullgraph(device, backend):
    require_backend(backend, device)
    torch._dynamo.reset()
    bank = SteeringBank(full_plans(64))
    x = torch.randn(2, 3, 64, device=device)
    gate, slot = torch.rand(2, 3, device=device), torch.randint(-1, len(bank), (2, 3), device=device)

    def f(x, gate, slot):
        y, mon = actshift.steer(x * 2, bank, gate=gate, slot=slot, return_monitors=True, backend=backend)
        return y + 1, mon

    (y, mon), (ey, emon) = torch.compile(f, fullgraph=True)(x, gate, slot), f(x, gate, slot)
    assert_close(y, ey, torch.float32)
    torch.testing.assert_close(mon, emon)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_out_ops_return_monitors_and_write_out(device, backend):
    require_backend(backend, device)
    d = 48
    bank = SteeringBank(full_plans(d))
    prog = tuple(bank.program(torch.device(device)))
    x = torch.randn(7, d, device=device)
    slot = torch.tensor([0, 1, 2, 3, 4, -1, 0], device=device)
    ey, emon = reference.steer_program(x, *prog, None, slot, None)
    out = torch.full_like(x, 7.0)
    mon = program_out_call(backend, x, prog, None, slot, None, out)
    assert_close(out, ey, torch.float32)
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)
    x2 = x.clone()
    mon = program_out_call(backend, x2, prog, None, slot, None, x2)
    assert_close(x2, ey, torch.float32)
    torch.testing.assert_close(mon, emon, rtol=1e-4, atol=1e-4)


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_large_rows_and_bank(backend, dtype):
    """Real model widths (one block / program per row holds up to 16384 values) and a 300-plan bank
    with per-row weights, in place."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(2)
    for d in (4096, 5120, 16384):
        pool = full_plans(d, gen)
        plans = [pool[i % len(pool)] if i % 7 else SteeringPlan(add=torch.randn(d, generator=gen), strength=i / 300)
                 for i in range(300)]
        bank = SteeringBank(plans)
        rows = 64
        x = torch.randn(rows, d, device="cuda").to(dtype)
        slot = torch.randint(-1, len(bank), (rows,), device="cuda")
        gate = torch.rand(rows, device="cuda")
        w = torch.randn(rows, bank.max_vectors, device="cuda")
        ey, emon = program_ref(x, bank, gate, slot, w)
        x2 = x.clone()
        y, mon = actshift.steer(x2, bank, slot=slot, gate=gate, weights=w, out=x2, return_monitors=True,
                                backend=backend)
        assert y is x2
        assert_close(y, ey, dtype)
        torch.testing.assert_close(mon, emon, rtol=1e-3, atol=1e-3 * d ** 0.5)
        assert torch.equal(y[slot < 0], x[slot < 0])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    """The program captures into a CUDA graph (no host sync, per-row weights included) and replays
    on new inputs."""
    require_backend(backend, "cuda")
    d = 1024
    bank = SteeringBank(full_plans(d))
    x = torch.randn(16, d, device="cuda", dtype=torch.float16)
    slot = torch.randint(-1, len(bank), (16,), device="cuda")
    w = torch.randn(16, bank.max_vectors, device="cuda")
    out = torch.empty_like(x)

    def step():
        return actshift.steer(x, bank, slot=slot, weights=w, out=out, return_monitors=True, backend=backend)[1]

    step()  # warm up: registration, compilation, cached bank tensors
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mon = step()
    x.copy_(torch.randn_like(x))
    slot.copy_(torch.randint(-1, len(bank), (16,), device="cuda"))
    w.copy_(torch.randn_like(w))
    graph.replay()
    ey, emon = program_ref(x, bank, None, slot, w)
    assert_close(out, ey, torch.float16)
    torch.testing.assert_close(mon, emon, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 70),
    d=st.integers(1, 2100),
    use_gate=st.booleans(),
    use_weights=st.booleans(),
    in_place=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_gpu_property_against_reference(backend, rows, d, use_gate, use_weights, in_place, dtype, seed):
    """Odd widths (unaligned rows, partial warps), row counts around a block, every dtype."""
    require_backend(backend, "cuda")
    g = torch.Generator().manual_seed(seed)
    bank = SteeringBank(full_plans(d, g))
    x = torch.randn(rows, d, generator=g).to(device="cuda", dtype=dtype)
    slot = torch.randint(-1, len(bank), (rows,), generator=g).cuda()
    gate = torch.rand(rows, generator=g).cuda() if use_gate else None
    w = torch.randn(rows, bank.max_vectors, generator=g).cuda() if use_weights else None
    ey, emon = program_ref(x, bank, gate, slot, w)
    x2 = x.clone()
    y, mon = actshift.steer(x2, bank, slot=slot, gate=gate, weights=w, return_monitors=True,
                            out=x2 if in_place else None, backend=backend)
    assert_close(y, ey, dtype)
    torch.testing.assert_close(mon, emon, rtol=1e-3, atol=1e-3)
    assert torch.equal(y[slot < 0], x[slot < 0])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cuda")
    plan = SteeringPlan(add=torch.randn(2, 8)).monitor(torch.randn(8))
    x = torch.randn(3, 8, device="cuda")
    cases = [
        (TypeError, "x", dict(x=x.int())),
        (ValueError, "hidden size", dict(x=torch.randn(3, 9, device="cuda"))),
        (ValueError, "gate", dict(gate=torch.rand(4, device="cuda"))),
        (ValueError, "slot", dict(slot=torch.tensor([0, 1, 0], device="cuda"))),
        (ValueError, "weights", dict(weights=torch.randn(3, 3, device="cuda"))),
        (ValueError, "weights", dict(weights=torch.randn(3, 2))),  # on the CPU
        (ValueError, "out", dict(out=torch.empty(3, 9, device="cuda"))),
    ]
    for exc, word, kw in cases:
        args = dict(x=x) | kw
        with pytest.raises(exc, match=word):
            actshift.steer(args.pop("x"), plan, backend=backend, return_monitors=True, **args)
    if backend == "cuda":  # the C++ checks of direct op calls
        prog = tuple(SteeringBank([plan]).program(torch.device("cuda")))
        with pytest.raises(TypeError, match="meta"):
            torch.ops.actshift.steer_program(x, prog[0].long(), *prog[1:], None, None, None)
        with pytest.raises(ValueError, match="monitor"):
            torch.ops.actshift.steer_program(x, *prog[:10], prog[10].cpu(), None, None, None)
        with pytest.raises(ValueError, match="overlaps"):
            torch.ops.actshift.steer_program_out(x[:2], *prog, None, None, None, x[1:])
