"""The relu_ffn op (and cats_mlp): exactness against the dense FFN at set sparsities in every dtype,
every activation gated and non-gated with biases, the skipped weight rows are never read,
reference facts (transformers' LlamaMLP, CATS), custom-op machinery, and bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, device_backend_params, dtypes_for, require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import reference

ACTS = ["relu", "fatrelu", "relu2", "drelu", "cats"]
NON_GATED = ["relu", "fatrelu", "relu2"]
# The thresholds of the exact-sparsity construction: gates of active neurons lie in [1, 2], of
# inactive ones in [-2, -1] (and in [0, 0.25] for fatrelu), so for cats |silu(g)| <= 0.27.
THRESHOLD = {"fatrelu": 0.5, "cats": 0.5}


def weights(d, ffn, dtype, device="cpu", gated=True, biases=False, gen=None):
    """Random FFN weights scaled so that pre-activations and outputs are O(1)."""
    w = {
        "w_gate": torch.randn(ffn, d, generator=gen) / math.sqrt(d),
        "w_up": torch.randn(ffn, d, generator=gen) / math.sqrt(d) if gated else None,
        "w_down_t": torch.randn(ffn, d, generator=gen) / math.sqrt(ffn),
        "b_gate": torch.randn(ffn, generator=gen) * 0.1 if biases else None,
        "b_up": torch.randn(ffn, generator=gen) * 0.1 if biases and gated else None,
        "b_down": torch.randn(d, generator=gen) if biases else None,
    }
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in w.items()}


def expected(x, act, threshold, w):
    f = {k: None if v is None else v.float() for k, v in w.items()}
    return reference.relu_ffn(x.float(), f["w_gate"], f["w_up"], f["w_down_t"], act, threshold, f["b_gate"], f["b_up"], f["b_down"])


def run(x, act, threshold, w, backend):
    return actshift.relu_ffn(x, w["w_gate"], w["w_up"], w["w_down_t"], act, threshold,
                             b_gate=w["b_gate"], b_up=w["b_up"], b_down=w["b_down"], backend=backend)


def gate_acts(x, act, threshold, w):
    """gate_act(W_gate x + b_gate) in fp32: nonzero marks the active neurons."""
    f = {k: None if v is None else v.float() for k, v in w.items()}
    g = F.linear(x.float(), f["w_gate"], f["b_gate"])
    return reference.ffn_activation(act, g, None, threshold)


def exact_sparsity_case(d, ffn, active, act, dtype, device, gated=True):
    """x [1, d] and weights whose gate rows are shifted along x so that exactly `active` neurons
    (a random set) are active, every gate far from its activation's threshold."""
    x = torch.randn(1, d)
    w = weights(d, ffn, torch.float32, gated=gated, biases=True)
    on = torch.zeros(ffn, dtype=torch.bool)
    on[torch.randperm(ffn)[:active]] = True
    target = torch.where(on, 1 + torch.rand(ffn), -1 - torch.rand(ffn))
    if act == "fatrelu":  # also inactive gates between 0 and the threshold
        target = torch.where(~on & (torch.rand(ffn) < 0.5), 0.25 * torch.rand(ffn), target)
    g = F.linear(x, w["w_gate"], w["b_gate"])[0]
    w["w_gate"] = w["w_gate"] + ((target - g)[:, None] * x) / x.square().sum()
    w = {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in w.items()}
    return x.to(device=device, dtype=dtype), w


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_exact_at_set_sparsity(device, backend, act, sparsity):
    require_backend(backend, device)
    d, ffn = 48, 300
    active = round(ffn * (1 - sparsity))
    t = THRESHOLD.get(act, 0.0)
    for dtype in dtypes_for(backend, device):
        x, w = exact_sparsity_case(d, ffn, active, act, dtype, device)
        assert int((gate_acts(x, act, t, w) != 0).sum()) == active  # the construction holds
        y = run(x.view(1, 1, d), act, t, w, backend)
        assert y.shape == (1, 1, d) and y.dtype == dtype
        assert_close(y.view(1, d), expected(x, act, t, w), dtype)
        if active == 0:  # only the down bias is left
            assert torch.equal(y.view(d), w["b_down"])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11 takes the dense fallback
def test_every_act_with_biases(device, backend, act, gated, rows):
    require_backend(backend, device)
    if not gated and act not in NON_GATED:
        return
    for dtype in dtypes_for(backend, device):
        gen = torch.Generator().manual_seed(rows)
        w = weights(40, 130, dtype, device, gated=gated, biases=True, gen=gen)
        x = torch.randn(rows, 40, generator=gen).to(device=device, dtype=dtype)
        t = safe_threshold(x, act, w) if act in THRESHOLD else 0.0
        assert_close(run(x, act, t, w, backend), expected(x, act, t, w), dtype)


def safe_threshold(x, act, w):
    """A threshold in the widest gap of the relevant gate values (|silu(g)| for cats, g for
    fatrelu) between their 30th and 70th percentiles, so rounding cannot flip a neuron."""
    f = {k: None if v is None else v.float() for k, v in w.items()}
    g = F.linear(x.float(), f["w_gate"], f["b_gate"]).flatten()
    v = (F.silu(g).abs() if act == "cats" else g.clamp(min=0)).sort().values
    if len(v) < 2:
        return float(v.sum()) / 2
    lo = int(0.3 * (len(v) - 1))
    hi = max(int(0.7 * (len(v) - 1)), lo + 1)
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = int(gaps.argmax())
    return float((v[lo + i] + v[lo + i + 1]) / 2)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if "reference" not in p.id])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("rows", [1, 4])
def test_inactive_up_and_down_rows_are_never_read(device, backend, gated, rows):
    """NaN in the up and down rows of neurons inactive in every row: reading them would give NaN."""
    require_backend(backend, device)
    d, ffn = 64, 256
    for dtype in dtypes_for(backend, device):
        x, w = exact_sparsity_case(d, ffn, 40, "relu", dtype, device, gated)
        x = x.expand(rows, d) * torch.linspace(0.5, 1.5, rows, device=device, dtype=dtype)[:, None]
        dead = gate_acts(x, "relu", 0.0, w).eq(0).all(0)
        assert int(dead.sum()) == ffn - 40
        w_nan = dict(w)
        for k in ("w_up", "w_down_t") if gated else ("w_down_t",):
            w_nan[k] = w[k].clone()
            w_nan[k][dead] = float("nan")
        assert_close(run(x, "relu", 0.0, w_nan, backend), expected(x, "relu", 0.0, w), dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 12),
    d=st.integers(1, 90),
    ffn=st.integers(1, 150),
    act=st.sampled_from(ACTS),
    gated=st.booleans(),
    biases=st.booleans(),
    shift=st.floats(-3, 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, d, ffn, act, gated, biases, shift, dtype, seed):
    """Odd sizes, rows on both sides of the dense crossover, gate biases shifted down to sweep the
    sparsity from dense to almost empty."""
    require_backend(backend, "cpu")
    assume(dtype in dtypes_for(backend, "cpu"))
    assume(gated or act in NON_GATED)
    g = torch.Generator().manual_seed(seed)
    w = weights(d, ffn, dtype, gated=gated, biases=biases, gen=g)
    if w["b_gate"] is not None:
        w["b_gate"] = w["b_gate"] + torch.tensor(shift).to(dtype)
    x = torch.randn(rows, d, generator=g).to(dtype)
    t = safe_threshold(x, act, w) if act in THRESHOLD and rows > 0 else 0.0
    assert_close(run(x, act, t, w, backend), expected(x, act, t, w), dtype)


def test_reference_matches_transformers_mlps():
    """Independent facts: transformers' LlamaMLP with a relu activation, and a plain 2-layer MLP."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="relu"))
    x = torch.randn(2, 5, 32)
    y = reference.relu_ffn(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.t().contiguous(), "relu")
    torch.testing.assert_close(y, mlp(x).detach())
    lin1, lin2 = torch.nn.Linear(32, 80), torch.nn.Linear(80, 32)
    y = reference.relu_ffn(x, lin1.weight, None, lin2.weight.t().contiguous(), "relu2",
                           b_gate=lin1.bias, b_down=lin2.bias)
    torch.testing.assert_close(y, lin2(F.relu(lin1(x)) ** 2).detach())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cats_mlp_is_a_thresholded_swiglu(backend):
    require_backend(backend, "cpu")
    w = weights(32, 100, torch.float32)
    x = torch.randn(3, 32)
    t = safe_threshold(x, "cats", w)
    s = F.silu(x @ w["w_gate"].t())
    want = (torch.where(s.abs() > t, s, 0.0) * (x @ w["w_up"].t())) @ w["w_down_t"]
    y = actshift.cats_mlp(x, w["w_gate"], w["w_up"], w["w_down_t"], t, backend=backend)
    assert_close(y, want, torch.float32)
    # at threshold 0 CATS is the dense SwiGLU MLP
    dense = (s * (x @ w["w_up"].t())) @ w["w_down_t"]
    assert_close(actshift.cats_mlp(x, w["w_gate"], w["w_up"], w["w_down_t"], 0.0, backend=backend), dense, torch.float32)


def test_cpu_rows_are_batch_invariant_and_thread_count_independent():
    require_backend("cpu", "cpu")
    w = weights(200, 700, torch.bfloat16, biases=True)
    x = torch.randn(8, 200).to(torch.bfloat16)
    batch = run(x, "relu", 0.0, w, "cpu")
    for r in (0, 5):
        assert torch.equal(run(x[r : r + 1], "relu", 0.0, w, "cpu")[0], batch[r])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, "relu", 0.0, w, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, batch)


def _op_args(dtype=torch.float32, rows=3, gated=True):
    w = weights(32, 64, dtype, gated=gated, biases=True)
    x = torch.randn(rows, 32).to(dtype)
    return (x, w["w_gate"], w["w_up"], w["w_down_t"], 1, 0.1, w["b_gate"], w["b_up"], w["b_down"])


def test_opcheck_cpu_op():
    require_backend("cpu", "cpu")
    op = torch.ops.actshift.relu_ffn.default
    torch.library.opcheck(op, _op_args())
    torch.library.opcheck(op, _op_args(torch.bfloat16, gated=False))
    torch.library.opcheck(op, _op_args(rows=12))  # dense fallback


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    w = weights(32, 64, torch.float32, biases=True)

    def f(x):
        return x + run(x * 0.5, "fatrelu", 0.05, w, backend)

    x = torch.randn(2, 2, 32)
    assert_close(torch.compile(f, fullgraph=True)(x), f(x), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_inputs_name_the_argument(backend):
    require_backend(backend, "cpu")
    w = weights(8, 16, torch.float32, biases=True)
    x = torch.randn(3, 8)
    cases = [
        (ValueError, "act", dict(act="gelu")),
        (ValueError, "w_up", dict(act="drelu", w_up=None, b_up=None)),
        (ValueError, "w_up", dict(act="cats", w_up=None, b_up=None)),
        (ValueError, "threshold", dict(act="fatrelu", threshold=-0.5)),
        (ValueError, "threshold", dict(act="cats", threshold=float("nan"))),
        (ValueError, "threshold", dict(act="fatrelu", threshold=float("inf"))),
        (ValueError, "threshold", dict(act="relu", threshold=0.5)),  # relu has no threshold
        (TypeError, "threshold", dict(act="fatrelu", threshold=torch.tensor(0.5))),
        (TypeError, "x", dict(x=x.double())),
        (TypeError, "x", dict(x=x.long())),
        (ValueError, "w_gate", dict(w_gate=torch.randn(16, 9))),
        (ValueError, "w_up", dict(w_up=torch.randn(15, 8))),
        (ValueError, "w_down_t", dict(w_down_t=torch.randn(8, 16))),  # down_proj.weight, not its transpose
        (ValueError, "w_down_t", dict(w_down_t=torch.randn(8, 16).t())),  # not contiguous
        (TypeError, "w_gate", dict(w_gate=w["w_gate"].half())),
        (TypeError, "w_down_t", dict(w_down_t=w["w_down_t"].bfloat16())),
        (ValueError, "b_gate", dict(b_gate=torch.randn(8))),
        (ValueError, "b_down", dict(b_down=torch.randn(16))),
        (TypeError, "b_up", dict(b_up=torch.randn(16).half())),
        (ValueError, "b_up", dict(w_up=None)),
    ]
    for exc, word, kw in cases:
        a = dict(x=x, act="relu", threshold=0.0) | w | kw
        with pytest.raises(exc, match=word):
            actshift.relu_ffn(a["x"], a["w_gate"], a["w_up"], a["w_down_t"], a["act"], a["threshold"],
                              b_gate=a["b_gate"], b_up=a["b_up"], b_down=a["b_down"], backend=backend)


def test_cpp_op_checks_direct_calls():
    require_backend("cpu", "cpu")
    x, wg, wu, wd, _, _, bg, bu, bd = _op_args()
    op = torch.ops.actshift.relu_ffn
    cases = [
        (ValueError, "act", (x, wg, wu, wd, 5, 0.0, bg, bu, bd)),
        (ValueError, "act", (x, wg, wu, wd, -1, 0.0, bg, bu, bd)),
        (ValueError, "w_up", (x, wg, None, wd, 3, 0.0, bg, None, bd)),
        (ValueError, "threshold", (x, wg, wu, wd, 1, -0.1, bg, bu, bd)),
        (ValueError, "threshold", (x, wg, wu, wd, 4, float("nan"), bg, bu, bd)),
        (ValueError, "threshold", (x, wg, wu, wd, 0, 0.3, bg, bu, bd)),
        (ValueError, "w_gate", (x, wg[:, :16], wu, wd, 0, 0.0, bg, bu, bd)),
        (ValueError, "w_down_t", (x, wg, wu, wd.t().contiguous(), 0, 0.0, bg, bu, bd)),
        (TypeError, "w_up", (x, wg, wu.half(), wd, 0, 0.0, bg, bu, bd)),
        (ValueError, "b_down", (x, wg, wu, wd, 0, 0.0, bg, bu, bg)),
        (ValueError, "b_up", (x, wg, None, wd, 0, 0.0, bg, bu, bd)),
        (TypeError, "x", (x.double(), wg.double(), wu.double(), wd.double(), 0, 0.0, None, None, None)),
    ]
    for exc, word, args in cases:
        with pytest.raises(exc, match=word):
            op(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_and_compile(backend):
    w = weights(256, 688, torch.float16, "cuda", biases=True)
    x = torch.randn(4, 256, device="cuda").half()
    assert_close(run(x, "relu", 0.0, w, backend), expected(x, "relu", 0.0, w), torch.float16)
    f = torch.compile(lambda x: run(x, "relu2", 0.0, w, backend), fullgraph=True)
    assert_close(f(x), expected(x, "relu2", 0.0, w), torch.float16)
    if backend == "cuda":
        args = (x, w["w_gate"], w["w_up"], w["w_down_t"], 0, 0.0, w["b_gate"], w["b_up"], w["b_down"])
        torch.library.opcheck(torch.ops.actshift.relu_ffn.default, args)


@pytest.mark.slow
def test_benchmark_providers_compute_the_same():
    """The benchmark's dense FFN and actshift agree on every quick case (Llama-2-7B shapes)."""
    require_backend("cpu", "cpu")
    from actshift.benchmarks import bench_relu_ffn
    from actshift.benchmarks.harness import EAGER

    for case in bench_relu_ffn.cases("cpu", quick=True):
        assert_close(case.providers["actshift-cpu"](), case.providers[EAGER](), torch.float32)
