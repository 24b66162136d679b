"""The route op (MoE routing with expert edits): the reference against the routers of the
installed transformers and against hand-checked facts (switch-off, forcing, ties, slots), every
backend against the reference, custom-op machinery (opcheck, torch.compile, CUDA graphs), and
bad inputs."""
import pytest
import torch
from conftest import require_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import actshift
from actshift import ExpertBank, ExpertPlan, reference

T = pytest.importorskip("transformers")


def softmax_topk(z, k, renorm):
    """What Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE routers compute (transformers 5.x)."""
    p = torch.softmax(z.float(), dim=-1)
    v, i = torch.topk(p, k, dim=-1)
    return i, (v / v.sum(-1, keepdim=True) if renorm else v)


@pytest.mark.parametrize("renorm", [True, False])
def test_reference_is_the_softmax_routers(renorm):
    z = torch.randn(64, 16)
    idx, w = reference.route(z, 4, renorm=renorm)
    ei, ew = softmax_topk(z, 4, renorm)
    assert torch.equal(idx, ei)
    torch.testing.assert_close(w, ew, rtol=1e-6, atol=1e-7)


def test_reference_is_the_deepseek_v3_router():
    cfg = T.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, norm_topk_prob=True)
    gate = T.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(gate.weight)
    gate.e_score_correction_bias.normal_(0, 0.3)
    h = torch.randn(50, 32)
    logits, ew, ei = gate(h)
    idx, w = reference.route(logits, 4, kind=reference.ROUTE_SIGMOID, bias=gate.e_score_correction_bias, n_group=4,
                             topk_group=2, scale=2.5, renorm=True)
    # transformers' topk(sorted=False) leaves the order open: compare by expert.
    order, eorder = idx.sort(-1), ei.sort(-1)
    assert torch.equal(order.values, eorder.values)
    torch.testing.assert_close(w.gather(1, order.indices), ew.gather(1, eorder.indices), rtol=1e-6, atol=1e-7)
    # the group limit binds: every pick lies in one of the 2 chosen groups of 4 experts
    assert ((idx // 4).unsqueeze(-1) == (idx // 4).unsqueeze(-2)).any(-1).all()
    assert max(len(set(row)) for row in (idx // 4).tolist()) <= 2


def test_switched_off_experts_are_never_picked_and_leave_the_normaliser():
    z = torch.randn(200, 8)
    top2 = torch.topk(z, 2).indices
    plan = ExpertPlan(8, off=[0, 3])
    idx, w = reference.route(z, 2, ExpertBank(plan).offsets, ExpertBank(plan).modes, renorm=False)
    assert not torch.isin(idx, torch.tensor([0, 3])).any()
    keep = torch.tensor([1, 2, 4, 5, 6, 7])
    p = torch.softmax(z[:, keep], -1)  # the softmax over the remaining experts
    torch.testing.assert_close(w, p.gather(1, torch.searchsorted(keep, idx)))
    # rows whose top-2 avoided the off experts route exactly as before
    clean = ~torch.isin(top2, torch.tensor([0, 3])).any(-1)
    assert torch.equal(idx[clean], top2[clean])


def test_forced_experts_come_first_and_replace_the_lowest_picks():
    z = torch.randn(100, 8)
    bank = ExpertBank(ExpertPlan(8, on=[6, 2]))
    idx, w = reference.route(z, 3, bank.offsets, bank.modes)
    assert torch.equal(idx[:, :2].sort(-1).values, torch.tensor([[2, 6]]).expand(100, 2))
    # the third pick is the best free expert
    free = z.clone()
    free[:, [2, 6]] = float("-inf")
    assert torch.equal(idx[:, 2], free.argmax(-1))
    p = torch.softmax(z, -1).gather(1, idx)
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True))


def test_offsets_times_strength_and_ties_pick_the_lowest_index():
    z = torch.zeros(1, 6)
    idx, _ = reference.route(z, 3)
    assert idx.tolist() == [[0, 1, 2]]
    bank = ExpertBank(ExpertPlan(6, offsets=[0, 0, 0, 1, 0, 1], strength=0.5))
    idx, w = reference.route(z, 2, bank.offsets, bank.modes, renorm=False)
    assert idx.tolist() == [[3, 5]]
    e = torch.tensor(0.5).exp()
    torch.testing.assert_close(w, torch.full((1, 2), float(e / (4 + 2 * e))))


def test_slots_choose_plans_per_row_and_minus_one_is_unedited():
    z = torch.randn(6, 8)
    plans = [ExpertPlan(8, off=[int(z[r].argmax())]) for r in range(2)] + [ExpertPlan(8, on=[7])]
    slot = torch.tensor([0, 1, 2, -1, 2, 0])
    idx, w = actshift.route(z, 2, plans, slot=slot, backend="reference")
    for r, s in enumerate(slot.tolist()):
        alone = actshift.route(z[r:r + 1], 2, None if s < 0 else plans[s], backend="reference")
        assert torch.equal(idx[r], alone[0][0])
        torch.testing.assert_close(w[r], alone[1][0])


def _case(g, rows, E, k, kind, n_group, topk_group, n_plans, dtype):
    # Logits on a 1/4 grid: ties are common (the rule must agree across backends), and sigmoid
    # keys of different logits differ by far more than any backend's rounding.
    z = (torch.randn(rows, E, generator=g) * 8).round() / 4
    plans = []
    for _ in range(n_plans):
        perm = torch.randperm(E, generator=g).tolist()
        n_on = int(torch.randint(0, k + 1, (1,), generator=g))
        n_off = int(torch.randint(0, E - k + 1, (1,), generator=g))
        offsets = (torch.randn(E, generator=g) * 8).round() / 4
        plans.append(ExpertPlan(E, offsets=offsets, on=perm[:n_on], off=perm[n_on:n_on + n_off], strength=2.0))
    slot = torch.randint(-1, max(n_plans, 1), (rows,), generator=g) if n_plans else None
    kw = dict(kind="softmax_topk", renorm=bool(torch.randint(0, 2, (1,), generator=g)))
    if kind == 1:
        kw = dict(kind="sigmoid_group_topk", renorm=kw["renorm"], n_group=n_group, topk_group=topk_group, scale=2.5,
                  bias=(torch.randn(E, generator=g) * 4).round() / 16)
    return z.to(dtype), (plans or None), slot, kw


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 9),
    E=st.sampled_from([1, 2, 3, 8, 16, 60, 64, 128]),
    k=st.integers(1, 8),
    kind=st.sampled_from([0, 1]),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 3)]),
    n_plans=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(backend, rows, E, k, kind, groups, n_plans, dtype, seed):
    require_backend(backend, "cpu")
    assume(k <= E and E % groups[0] == 0 and (kind == 1 or groups == (1, 1)))
    assume(not (backend == "triton" and dtype == torch.bfloat16))  # the interpreter lacks bf16
    g = torch.Generator().manual_seed(seed)
    z, plans, slot, kw = _case(g, rows, E, k, kind, *groups, n_plans, dtype)
    idx, w = actshift.route(z, k, plans, slot=slot, backend=backend, **kw)
    ridx, rw = actshift.route(z, k, plans, slot=slot, backend="reference", **kw)
    assert idx.dtype == torch.long and w.dtype == torch.float32 and idx.shape == (rows, k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def test_leading_dims_and_empty_rows():
    z = torch.randn(2, 3, 8)
    idx, w = actshift.route(z, 2, backend="reference")
    assert idx.shape == (2, 3, 2) and w.shape == (2, 3, 2)
    for backend in ("cpu", "triton"):
        require_backend(backend, "cpu")
        i2, w2 = actshift.route(z, 2, backend=backend)
        assert torch.equal(i2, idx)
        e = actshift.route(torch.randn(0, 8), 2, ExpertPlan(8, off=[1]), backend=backend)
        assert e[0].shape == (0, 2) and e[1].shape == (0, 2)


def test_opcheck_cpu_and_triton_ops():
    require_backend("cpu", "cpu")
    bank = ExpertBank([ExpertPlan(16, off=[1], on=[2], offsets=torch.randn(16)), ExpertPlan(16)])
    z = torch.randn(5, 16)
    slot = torch.tensor([0, 1, -1, 0, 1])
    bias = torch.randn(16)
    cases = [(z, 2, bank.offsets, bank.modes, slot, None, 0, True, 1, 1, 1.0),
             (z.half(), 3, None, None, None, bias, 1, True, 4, 2, 2.5)]
    for args in cases:
        torch.library.opcheck(torch.ops.actshift.route.default, args)
    require_backend("triton", "cpu")
    from actshift.ops._sparse import triton_op

    for args in cases:
        torch.library.opcheck(triton_op("route"), args)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend, "cpu")
    torch._dynamo.reset()
    bank = ExpertBank([ExpertPlan(8, off=[0]), ExpertPlan(8, on=[5], offsets=torch.randn(8))])
    z, slot = torch.randn(2, 3, 8), torch.tensor([[0, 1, -1], [1, 1, 0]])

    def f(z):
        idx, w = actshift.route(z * 2, 2, bank, slot=slot, backend=backend)
        return idx, w * 3

    got, want = torch.compile(f, fullgraph=True)(z), f(z)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_plan_errors_name_the_argument():
    cases = [
        (ValueError, "off", dict(off=[8])),
        (ValueError, "on", dict(on=[-1])),
        (TypeError, "off", dict(off=[1.5])),
        (ValueError, "offsets", dict(offsets=[0.0] * 7 + [float("nan")])),
        (ValueError, "offsets", dict(offsets=[0.0] * 7)),
        (ValueError, "strength", dict(strength=float("inf"))),
        (ValueError, "both in off and on", dict(off=[1], on=[1])),
        (ValueError, "off", dict(off=list(range(8)))),
    ]
    for exc, word, kw in cases:
        with pytest.raises(exc, match=word):
            ExpertPlan(8, **kw)
    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match="on forces 3 experts but the router picks only k=2"):
        actshift.route(z, 2, ExpertPlan(8, on=[1, 2, 3]))
    with pytest.raises(ValueError, match="off switches off 7 of 8 experts, leaving fewer than k=2"):
        actshift.route(z, 2, ExpertPlan(8, off=range(7)))
    with pytest.raises(ValueError, match="plan has 6 experts"):
        actshift.route(z, 2, ExpertPlan(6))
    with pytest.raises(ValueError, match="slot holds 2"):
        actshift.route(z, 2, [ExpertPlan(8), ExpertPlan(8)], slot=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="k must be"):
        actshift.route(z, 9)
    with pytest.raises(ValueError, match="kind"):
        actshift.route(z, 2, kind="sparsemixer")
    with pytest.raises(ValueError, match="n_group"):
        actshift.route(z, 2, kind="sigmoid_group_topk", n_group=3)
    with pytest.raises(TypeError, match="logits"):
        actshift.route(z.long(), 2)


def test_cpp_op_checks_direct_calls():
    require_backend("cpu", "cpu")
    op = torch.ops.actshift.route
    z = torch.randn(3, 8)
    bank = ExpertBank(ExpertPlan(8))
    with pytest.raises(ValueError, match="forces 3 experts on but k=2"):
        modes = bank.modes.clone()
        modes[0, :3] = 2
        op(z, 2, bank.offsets, modes, None, None, 0, True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="offsets of plan 0"):
        op(z, 2, torch.full((1, 8), float("inf")), bank.modes, None, None, 0, True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="slot holds 1"):
        op(z, 2, bank.offsets, bank.modes, torch.tensor([0, 1, 0]), None, 0, True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        op(z, 0, None, None, None, None, 0, True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="n_group"):
        op(z, 2, None, None, None, None, 1, True, 3, 1, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_against_reference_opcheck_compile_and_graphs(backend):
    g = torch.Generator().manual_seed(0)
    for E, k, kind, groups in [(8, 2, 0, (1, 1)), (64, 8, 0, (1, 1)), (256, 8, 1, (8, 4)), (128, 2, 1, (1, 1))]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            z, plans, slot, kw = _case(g, 300, E, k, kind, *groups, 3, dtype)
            kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
            idx, w = actshift.route(z.cuda(), k, plans, slot=slot.cuda(), backend=backend, **kw)
            ridx, rw = actshift.route(z.cuda(), k, plans, slot=slot.cuda(), backend="reference", **kw)
            assert torch.equal(idx, ridx)
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    bank = ExpertBank([ExpertPlan(64, off=[0, 1]), ExpertPlan(64, on=[5])])
    z, slot = torch.randn(16, 64, device="cuda"), torch.randint(-1, 2, (16,), device="cuda")
    if backend == "cuda":
        torch.library.opcheck(torch.ops.actshift.route.default,
                              (z, 2, *bank.tensors(z.device), slot, None, 0, True, 1, 1, 1.0))
    f = torch.compile(lambda z: actshift.route(z, 2, bank, slot=slot, backend=backend), fullgraph=True)
    assert torch.equal(f(z)[0], actshift.route(z, 2, bank, slot=slot, backend="reference")[0])
    actshift.route(z, 2, bank, slot=slot, backend=backend)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = actshift.route(z, 2, bank, slot=slot, backend=backend)
    z.copy_(torch.randn_like(z))
    slot.copy_(torch.randint(-1, 2, (16,), device="cuda"))
    graph.replay()
    want = actshift.route(z, 2, bank, slot=slot, backend="reference")
    assert torch.equal(out[0], want[0])
    torch.testing.assert_close(out[1], want[1], rtol=1e-5, atol=1e-6)
