"""The sparse_threshold op: reference facts, every backend against the reference (bit-exact: the op
only selects values), custom-op machinery (opcheck, torch.compile), and bad inputs."""
import pytest
import torch
from conftest import device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def test_reference_by_hand():
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 0.49, float("nan"), 3.0]])
    y = reference.sparse_threshold(x, 0.5)
    assert_same(y, torch.tensor([[-2.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 3.0]]))  # |x| == t is zeroed
    t = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    assert_same(reference.sparse_threshold(x, t), torch.tensor([[-2.0, -0.5, 0.0, 0.0, 0.49, float("nan"), 0.0]]))


SHAPES = [(1, 1), (1, 7), (5, 33), (3, 4097), (2, 3, 64), (0, 16)]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_reference(device, backend, shape, per_channel):
    require_backend(backend, device)
    n = shape[-1]
    t = torch.rand(n, device=device) if per_channel else 0.7
    for dtype in dtypes_for(backend, device):
        x = torch.randn(shape, device=device).to(dtype)
        if x.numel():
            x.view(-1)[0] = float("nan")
        y = actshift.sparse_threshold(x, t, backend=backend)
        assert y.shape == x.shape and y.dtype == dtype
        assert_same(y, reference.sparse_threshold(x, t))
        # independent of the reference: zero exactly where |x| <= t
        assert torch.equal(y == 0, (x.float().abs() <= torch.as_tensor(t, device=device)) | (x == 0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 9),
    n=st.integers(1, 300),
    per_channel=st.booleans(),
    t=st.floats(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, n, per_channel, t, dtype, seed):
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    thr = torch.rand(n, generator=g) * t if per_channel else t
    assert_same(actshift.sparse_threshold(x, thr, backend=backend), reference.sparse_threshold(x, thr))


def test_opcheck_cpu_op():
    require_backend("cpu", "cpu")
    x = torch.randn(4, 32)
    torch.library.opcheck(torch.ops.actshift.sparse_threshold.default, (x, torch.tensor([0.5])))
    torch.library.opcheck(torch.ops.actshift.sparse_threshold.default, (x.half(), torch.rand(32)))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    x, t = torch.randn(2, 3, 64), torch.rand(64)

    def f(x):
        return actshift.sparse_threshold(x * 2, t, backend=backend) + actshift.sparse_threshold(x, 0.5, backend=backend)

    assert_same(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cpu")
    x = torch.randn(3, 8)
    cases = [
        (TypeError, "x", dict(x=x.int())),
        (TypeError, "x", dict(x=x.double())),
        (TypeError, "x", dict(x=[1.0, 2.0])),
        (ValueError, "x", dict(x=torch.tensor(1.0))),
        (ValueError, "threshold", dict(threshold=-0.1)),
        (ValueError, "threshold", dict(threshold=float("nan"))),
        (ValueError, "threshold", dict(threshold=float("inf"))),
        (TypeError, "threshold", dict(threshold="0.5")),
        (TypeError, "threshold", dict(threshold=True)),
        (ValueError, "threshold", dict(threshold=torch.rand(7))),
        (ValueError, "threshold", dict(threshold=torch.rand(2, 8))),
        (ValueError, "threshold", dict(threshold=torch.tensor([0.1] * 7 + [-1.0]))),
        (ValueError, "threshold", dict(threshold=torch.tensor([float("inf")]))),
        (TypeError, "threshold", dict(threshold=torch.ones(8, dtype=torch.long))),
    ]
    for exc, word, kw in cases:
        args = dict(x=x, threshold=0.5) | kw
        with pytest.raises(exc, match=word):
            actshift.sparse_threshold(args["x"], args["threshold"], backend=backend)


def test_cpp_op_checks_direct_calls():
    require_backend("cpu", "cpu")
    x = torch.randn(3, 8)
    op = torch.ops.actshift.sparse_threshold
    with pytest.raises(TypeError, match="x"):
        op(x.double(), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(8), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="x"):
        op(x.t(), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="threshold"):
        op(x, torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="threshold"):
        op(x, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="threshold"):
        op(x, torch.rand(5))
    with pytest.raises(TypeError, match="threshold"):
        op(x, torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_and_compile(backend):
    x, t = torch.randn(4, 300, device="cuda").half(), torch.rand(300, device="cuda")
    assert_same(actshift.sparse_threshold(x, t, backend=backend), reference.sparse_threshold(x, t))
    f = torch.compile(lambda x: actshift.sparse_threshold(x, t, backend=backend), fullgraph=True)
    assert_same(f(x), reference.sparse_threshold(x, t))
    if backend == "cuda":
        torch.library.opcheck(torch.ops.actshift.sparse_threshold.default, (x, t))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_vector_and_scalar_paths(dtype):
    """16-byte packs for aligned rows; one element per thread for odd rows or a misaligned x."""
    for rows, n in [(3, 4096), (70000, 8), (2, 4097), (5, 33)]:
        x = torch.randn(rows, n, device="cuda").to(dtype)
        x.view(-1)[:: 7] = float("nan")
        t = torch.rand(n, device="cuda")
        buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        x_mis = buf[1:].view(rows, n)
        x_mis.copy_(x)
        for xx in (x, x_mis):
            assert_same(actshift.sparse_threshold(xx, t, backend="cuda"), reference.sparse_threshold(x, t))
            assert_same(actshift.sparse_threshold(xx, 0.5, backend="cuda"), reference.sparse_threshold(x, 0.5))
