"""The sparse_linear op: reference facts, every backend against the reference (sparse and dense
paths), the skipped weight rows are never read, determinism, custom-op machinery, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference


def make(rows, n, out, sparsity, dtype, device="cpu", bias=True, gen=None):
    """x [rows, n] with about `sparsity` of |x| <= 1 (threshold 1.0), weights scaled to O(1) outputs."""
    x = torch.randn(rows, n, generator=gen)
    small = torch.rand(rows, n, generator=gen) < sparsity
    x = torch.where(small, x.clamp(-0.9, 0.9), torch.sign(x) * (1.1 + x.abs()))
    w = torch.randn(n, out, generator=gen) / max(1, n) ** 0.5
    b = torch.randn(out, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def expected(x, w, t, b):
    return reference.sparse_linear(x.float(), w.float(), t, None if b is None else b.float())


def test_reference_is_linear_of_thresholded_x():
    x, w, b = make(3, 20, 7, 0.5, torch.float32)
    lin = torch.nn.Linear(20, 7)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        lin.bias.copy_(b)
    xt = torch.where(x.abs() > 1.0, x, torch.zeros(()))
    torch.testing.assert_close(reference.sparse_linear(x, lin.weight.t().contiguous(), 1.0, lin.bias), lin(xt))


ROWS = [0, 1, 2, 5, 16, 17, 40]  # 17 and 40 take the dense fallback


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_reference(device, backend, rows, sparsity):
    require_backend(backend, device)
    for dtype in dtypes_for(backend, device):
        for bias in (True, False):
            x, w, b = make(rows, 96, 75, sparsity, dtype, device, bias)
            y = actshift.sparse_linear(x, w, 1.0, b, backend=backend)
            assert y.shape == (rows, 75) and y.dtype == dtype
            assert_close(y, expected(x, w, 1.0, b), dtype)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_per_channel_threshold_leading_dims_and_nan(device, backend):
    require_backend(backend, device)
    for dtype in dtypes_for(backend, device):
        x, w, b = make(6, 40, 33, 0.5, dtype, device)
        t = torch.rand(40, device=device) * 2
        x3 = x.view(2, 3, 40)
        y = actshift.sparse_linear(x3, w, t, b, backend=backend)
        assert y.shape == (2, 3, 33)
        assert_close(y.view(6, 33), expected(x, w, t, b), dtype)
        x[1, 5] = float("nan")  # NaN is kept by the threshold and reaches its row only
        y = actshift.sparse_linear(x, w, t, b, backend=backend)
        assert y[1].isnan().all() and not y[[0, 2, 3, 4, 5]].isnan().any()


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if "reference" not in p.id])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_inactive_weight_rows_are_never_read(device, backend, rows):
    """NaN in the weight rows of inputs inactive in every row: a kernel that read them would
    return NaN (0·NaN = NaN)."""
    require_backend(backend, device)
    for dtype in dtypes_for(backend, device):
        x, w, b = make(rows, 256, 64, 0.0, dtype, device)
        dead = torch.rand(256, device=device) < 0.6
        x[:, dead] = 0.5
        w_nan = w.clone()
        w_nan[dead] = float("nan")
        y = actshift.sparse_linear(x, w_nan, 1.0, b, backend=backend)
        assert_close(y, expected(x, w, 1.0, b), dtype)


def test_cpu_rows_are_batch_invariant_and_thread_count_independent():
    """Each output sums its terms in input order: a row's result is bit-identical alone or in any
    batch of <= 16 rows, and with any number of threads."""
    require_backend("cpu", "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = make(16, 1000, 3000, 0.98, dtype)  # union density about 0.28
        batch = actshift.sparse_linear(x, w, 1.0, b, backend="cpu")
        for r in (0, 7, 15):
            assert torch.equal(actshift.sparse_linear(x[r : r + 1], w, 1.0, b, backend="cpu")[0], batch[r])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = actshift.sparse_linear(x, w, 1.0, b, backend="cpu")
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, batch)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 20),
    n=st.integers(1, 200),
    out=st.integers(1, 150),
    sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.97, 1.0]),
    per_channel=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, n, out, sparsity, per_channel, bias, dtype, seed):
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    g = torch.Generator().manual_seed(seed)
    x, w, b = make(rows, n, out, sparsity, dtype, bias=bias, gen=g)
    t = torch.where(torch.rand(n, generator=g) < 0.5, 0.95, 1.05) if per_channel else 1.0
    assert_close(actshift.sparse_linear(x, w, t, b, backend=backend), expected(x, w, t, b), dtype)


def test_opcheck_cpu_op():
    require_backend("cpu", "cpu")
    x, w, b = make(3, 32, 24, 0.5, torch.float32)
    op = torch.ops.actshift.sparse_linear.default
    torch.library.opcheck(op, (x, w, torch.tensor([1.0]), b))
    torch.library.opcheck(op, (x.half(), w.half(), torch.rand(32), None))
    torch.library.opcheck(op, (torch.randn(20, 32), w, torch.tensor([1.0]), b))  # dense fallback


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    x, w, b = make(4, 64, 48, 0.5, torch.float32)
    t = torch.rand(64) + 0.5

    def f(x):
        return F.relu(actshift.sparse_linear(x * 1.5, w, t, b, backend=backend)) + 1

    assert_close(torch.compile(f, fullgraph=True)(x.view(2, 2, 64)), f(x.view(2, 2, 64)), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cpu")
    x, w, b = make(3, 8, 5, 0.5, torch.float32)
    cases = [
        (TypeError, "x", dict(x=x.int())),
        (TypeError, "x", dict(x=x.double())),
        (ValueError, "weight_t", dict(w=torch.randn(9, 5))),  # in != x's last dim
        (ValueError, "weight_t", dict(w=torch.randn(5, 8).t())),  # not contiguous (linear.weight.t())
        (ValueError, "weight_t", dict(w=torch.randn(8))),
        (TypeError, "weight_t", dict(w=w.half())),
        (TypeError, "weight_t", dict(w=w.double())),
        (ValueError, "bias", dict(b=torch.randn(6))),
        (TypeError, "bias", dict(b=b.half())),
        (ValueError, "threshold", dict(t=-1.0)),
        (ValueError, "threshold", dict(t=float("nan"))),
        (ValueError, "threshold", dict(t=torch.rand(5))),
        (ValueError, "threshold", dict(t=torch.tensor([1.0] * 7 + [float("inf")]))),
    ]
    for exc, word, kw in cases:
        a = dict(x=x, w=w, t=1.0, b=b) | kw
        with pytest.raises(exc, match=word):
            actshift.sparse_linear(a["x"], a["w"], a["t"], a["b"], backend=backend)


def test_cpp_op_checks_direct_calls():
    require_backend("cpu", "cpu")
    x, w, b = make(3, 8, 5, 0.5, torch.float32)
    t = torch.tensor([1.0])
    op = torch.ops.actshift.sparse_linear
    with pytest.raises(ValueError, match="weight_t"):
        op(x, torch.randn(9, 5), t, b)
    with pytest.raises(ValueError, match="weight_t"):
        op(x, torch.randn(5, 8).t(), t, b)
    with pytest.raises(TypeError, match="weight_t"):
        op(x, w.half(), t, b)
    with pytest.raises(ValueError, match="bias"):
        op(x, w, t, torch.randn(4))
    with pytest.raises(ValueError, match="threshold"):
        op(x, w, torch.tensor([-1.0]), b)
    with pytest.raises(TypeError, match="x"):
        op(x.double(), w.double(), t, None)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_and_compile(backend):
    x, w, b = make(4, 256, 192, 0.7, torch.float16, "cuda")
    y = actshift.sparse_linear(x, w, 1.0, b, backend=backend)
    assert_close(y, expected(x, w, 1.0, b), torch.float16)
    f = torch.compile(lambda x: actshift.sparse_linear(x, w, 1.0, b, backend=backend), fullgraph=True)
    assert_close(f(x), expected(x, w, 1.0, b), torch.float16)
    if backend == "cuda":
        torch.library.opcheck(torch.ops.actshift.sparse_linear.default, (x, w, torch.tensor([1.0], device="cuda"), b))


@pytest.mark.slow
def test_benchmark_providers_compute_the_same():
    """The benchmark compares like with like: eager (threshold, then F.linear) and actshift agree
    on every quick case, and the union density in the note matches the inputs."""
    require_backend("cpu", "cpu")
    from actshift.benchmarks import bench_sparse_linear
    from actshift.benchmarks.harness import EAGER

    for case in bench_sparse_linear.cases("cpu", quick=True):
        want = case.providers[EAGER]()
        assert_close(case.providers["actshift-cpu"](), want, torch.float32)
        assert "union density" in case.note
