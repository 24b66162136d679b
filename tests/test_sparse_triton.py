"""Triton-specific cases of the sparse ops (kernels/sparse_threshold.py, sparse_linear.py,
relu_ffn.py), beyond the backend-parametrized tests of test_sparse_*.py / test_relu_ffn.py: tile
and split-K boundaries, several K blocks per program, several row blocks, empty dims, the
custom-op machinery of the `_triton` ops (tests/test_triton_gpu.py compiles every variant for sm_90)."""
import math

import pytest
import torch
from conftest import assert_close, dtypes_for, require_backend

import actshift
from actshift import reference

pytestmark = pytest.mark.triton

ACT_CODES = {name: i for i, name in enumerate(reference.SPARSE_ACTS)}


@pytest.fixture
def kernels():
    """The kernel modules, with their `_triton` ops registered."""
    require_backend("triton", "cpu")
    from actshift.kernels import relu_ffn, sparse_linear, sparse_threshold

    for module in (sparse_threshold, sparse_linear, relu_ffn):
        module.register()
    return sparse_threshold, sparse_linear, relu_ffn


def linear_case(rows, k, n, dtype, density=0.5, gen=None):
    """x [rows, k] with about `density` of its entries above the threshold 1.0, weight_t, bias."""
    x = torch.where(torch.rand(rows, k, generator=gen) < density, 1.5, 0.5) * torch.randn(rows, k, generator=gen).sign()
    x = x * (1 + torch.rand(rows, k, generator=gen))  # |x| in (0.5, 1) or (1.5, 3): never near t
    w = torch.randn(k, n, generator=gen) / math.sqrt(k)
    b = torch.randn(n, generator=gen)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def linear_expected(x, w, t, b):
    return reference.sparse_linear(x.float(), w.float(), t, None if b is None else b.float())


# K and N around the tiles (BLOCK_K 32, BLOCK_N 256), odd sizes, 1 row (GEMV path), 2..16 rows
# (tl.dot path, padded to 16), and 17 rows (the dense fallback).
LINEAR_SHAPES = [(1, 32, 256), (1, 33, 257), (2, 65, 255), (7, 31, 513), (16, 97, 17), (17, 40, 30), (1, 1, 1)]


@pytest.mark.parametrize("rows,k,n", LINEAR_SHAPES, ids=str)
def test_sparse_linear_tile_boundaries(kernels, rows, k, n):
    for dtype in dtypes_for("triton", "cpu"):
        x, w, b = linear_case(rows, k, n, dtype)
        t = torch.rand(k) * 0.4 + 1.0  # per channel, between the two |x| bands
        for thr, bias in ((torch.tensor([1.0]), b), (t, None)):
            y = torch.ops.actshift.sparse_linear_triton(x, w, thr, bias)
            assert y.shape == (rows, n) and y.dtype == dtype
            assert_close(y, linear_expected(x, w, thr, bias), dtype)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_split_k_with_several_k_blocks_per_program(kernels, monkeypatch, rows):
    """Few target programs, so each program loops over several K blocks, some all inactive; NaN in
    the weight rows of channels inactive in every row shows they are never read."""
    _, sparse_linear, _ = kernels
    monkeypatch.setattr(sparse_linear, "_TARGET_PROGRAMS", 2)
    gen = torch.Generator().manual_seed(rows)
    for dtype in dtypes_for("triton", "cpu"):
        x, w, b = linear_case(rows, 300, 40, dtype, density=0.1, gen=gen)
        x[:, 64:160] = 0.25  # three whole K blocks inactive in every row
        dead = (x.float().abs() <= 1.0).all(0)
        w_nan = w.clone()
        w_nan[dead] = float("nan")
        y = torch.ops.actshift.sparse_linear_triton(x, w_nan, torch.tensor([1.0]), b)
        assert_close(y, linear_expected(x, w, 1.0, b), dtype)


def test_sparse_linear_empty_dims(kernels):
    b = torch.randn(5)
    y = torch.ops.actshift.sparse_linear_triton(torch.randn(3, 0), torch.randn(0, 5), torch.tensor([0.5]), b)
    assert torch.equal(y, b.expand(3, 5))  # no inputs: only the bias
    assert torch.ops.actshift.sparse_linear_triton(torch.randn(0, 4), torch.randn(4, 5), torch.tensor([0.5]), b).shape == (0, 5)
    assert torch.ops.actshift.sparse_linear_triton(torch.randn(2, 4), torch.randn(4, 0), torch.tensor([0.5]), None).shape == (2, 0)


def test_sparse_threshold_blocks_strides_and_nan(kernels):
    for dtype in dtypes_for("triton", "cpu"):
        base = torch.randn(3, 2100).to(dtype)
        x = base[:, 3:2052]  # 2049 columns (3 blocks of 1024), row stride 2100
        x[1, 1500] = float("nan")
        for t in (torch.tensor([0.7]), torch.rand(2049) * 2):
            y = torch.ops.actshift.sparse_threshold_triton(x, t)
            assert y.is_contiguous() and y[1, 1500].isnan()
            assert_close(y, reference.sparse_threshold(x, t), dtype)


def ffn_case(rows, d, ffn, dtype, gated, gen):
    w = [torch.randn(ffn, d, generator=gen) / math.sqrt(d) for _ in range(2)]
    w_down_t = torch.randn(ffn, d, generator=gen) / math.sqrt(ffn)
    biases = (torch.randn(ffn, generator=gen) * 0.1, torch.randn(ffn, generator=gen) * 0.1, torch.randn(d, generator=gen))
    x = torch.randn(rows, d, generator=gen)
    cast = lambda t: t.to(dtype)  # noqa: E731
    w_up, b_up = (cast(w[1]), cast(biases[1])) if gated else (None, None)
    return cast(x), cast(w[0]), w_up, cast(w_down_t), cast(biases[0]), b_up, cast(biases[2])


def ffn_expected(x, wg, wu, wd, act, t, bg, bu, bd):
    f = lambda v: None if v is None else v.float()  # noqa: E731
    return reference.relu_ffn(x.float(), f(wg), f(wu), f(wd), act, t, f(bg), f(bu), f(bd))


# d around BLOCK_D (256) and ffn around BLOCK_F (16) at 1 and 2..8 rows; 9 rows takes the dense
# 64-row tiles (and 16-row down tiles), 70 rows two 64-row blocks.
@pytest.mark.parametrize("rows,d,ffn", [(1, 257, 33), (3, 255, 16), (9, 17, 47), (70, 40, 20)], ids=str)
@pytest.mark.parametrize("act", reference.SPARSE_ACTS)
def test_relu_ffn_tiles_and_row_blocks(kernels, rows, d, ffn, act):
    """The op itself (no wrapper fallback) for any row count; thresholds away from every gate."""
    gen = torch.Generator().manual_seed(rows * 7 + ffn)
    for gated in (True, False):
        if not gated and act in reference.GATED_ONLY_ACTS:
            continue
        for dtype in dtypes_for("triton", "cpu"):
            x, wg, wu, wd, bg, bu, bd = ffn_case(rows, d, ffn, dtype, gated, gen)
            t = 0.0
            if act in reference.THRESHOLD_ACTS:
                g = torch.nn.functional.linear(x.float(), wg.float(), bg.float()).flatten()
                v = (torch.nn.functional.silu(g).abs() if act == "cats" else g).sort().values
                i = int((v[1:] - v[:-1])[len(v) // 4 : 3 * len(v) // 4].argmax()) + len(v) // 4
                t = max(0.0, float(v[i] + v[i + 1]) / 2)  # the middle of the widest central gap
            y = torch.ops.actshift.relu_ffn_triton(x, wg, wu, wd, ACT_CODES[act], t, bg, bu, bd)
            assert y.shape == (rows, d) and y.dtype == dtype
            assert_close(y, ffn_expected(x, wg, wu, wd, act, t, bg, bu, bd), dtype)


def test_relu_ffn_empty_dims(kernels):
    x, wg, wu, wd, bg, bu, bd = ffn_case(2, 8, 0, torch.float32, True, torch.Generator().manual_seed(0))
    y = torch.ops.actshift.relu_ffn_triton(x, wg, wu, wd, 0, 0.0, bg, bu, bd)
    assert torch.equal(y, bd.expand(2, 8))  # no neurons: only the down bias
    x0 = torch.randn(0, 8)
    w = torch.randn(4, 8)
    assert torch.ops.actshift.relu_ffn_triton(x0, w, w, w, 0, 0.0, None, None, None).shape == (0, 8)


def test_relu_ffn_nan_gate_is_active_and_propagates(kernels):
    x, wg, wu, wd, bg, bu, bd = ffn_case(2, 24, 40, torch.float32, True, torch.Generator().manual_seed(1))
    bg[5] = float("nan")
    for act in ("relu", "fatrelu", "cats"):
        y = torch.ops.actshift.relu_ffn_triton(x, wg, wu, wd, ACT_CODES[act], 0.1 if act != "relu" else 0.0, bg, bu, bd)
        assert y.isnan().all()


def test_opcheck_triton_ops(kernels):
    x, w, b = linear_case(3, 40, 24, torch.float32)
    torch.library.opcheck(torch.ops.actshift.sparse_threshold_triton.default, (x, torch.tensor([1.0])))
    torch.library.opcheck(torch.ops.actshift.sparse_threshold_triton.default, (x, torch.rand(40) * 2))
    torch.library.opcheck(torch.ops.actshift.sparse_linear_triton.default, (x, w, torch.tensor([1.0]), b))
    torch.library.opcheck(torch.ops.actshift.sparse_linear_triton.default, (x[:1], w, torch.rand(40) * 2, None))
    x, wg, wu, wd, bg, bu, bd = ffn_case(3, 24, 40, torch.float32, True, torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.actshift.relu_ffn_triton.default, (x, wg, wu, wd, 4, 0.1, bg, bu, bd))
    torch.library.opcheck(torch.ops.actshift.relu_ffn_triton.default, (x, wg, None, wd, 1, 0.1, None, None, None))


def test_torch_compile_fullgraph_triton(kernels):
    torch._dynamo.reset()
    x, w, b = linear_case(2, 40, 24, torch.float32)
    _, wg, wu, wd, bg, bu, bd = ffn_case(2, 24, 40, torch.float32, True, torch.Generator().manual_seed(3))

    def f(x):
        y = actshift.sparse_linear(actshift.sparse_threshold(x * 2, 1.0, backend="triton"), w, 1.5, b, backend="triton")
        return actshift.relu_ffn(y, wg, wu, wd, "relu2", b_gate=bg, b_up=bu, b_down=bd, backend="triton") + 1

    assert_close(torch.compile(f, fullgraph=True)(x), f(x), torch.float32)
