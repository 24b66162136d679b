"""Autograd through the kernel ops (C++ and Triton) and torch's in-place rules for their out= forms.

The backward of every op recomputes its reference (ops/_autograd.py). Two kinds of checks:
- gradcheck in fp64: the kernels take fp32/fp16/bf16 only, so the op's CPU kernel is swapped for
  the reference (which computes in fp64 for fp64 inputs) inside a scoped library; the call still
  goes through the op's registered autograd, so this checks the registered backward against
  finite differences of the op's contract;
- fp32 parity: gradients through the public wrappers on the cpu and Triton backends equal the
  reference backend's (which is plain PyTorch autograd), within tolerance.
"""
import pytest
import torch

import actshift
from actshift import reference
from actshift.steering.plan import SteeringBank, SteeringPlan

BACKENDS = ["cpu", "triton"]
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)

pytestmark = pytest.mark.filterwarnings("ignore:.*Overriding a previously registered kernel.*")


def _with_reference_kernel(op_name: str, fn, args):
    """gradcheck of actshift::<op_name> with its CPU kernel replaced by `fn` (fp64-capable). The
    kernel runs under no_grad, as a real kernel would: gradients come from the registered backward."""
    op = getattr(torch.ops.actshift, op_name)
    with torch.library._scoped_library("actshift", "IMPL") as lib:
        lib.impl(op_name, torch.no_grad()(fn), "CPU")
        assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-6, rtol=1e-5)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def _full_bank(d: int) -> SteeringBank:
    """Two plans using every program part; slot picks one per row."""
    u = torch.linalg.qr(torch.randn(d, 2)).Q.t()  # 2 orthonormal directions
    a = (SteeringPlan(strength=0.7, renorm=True)
         .ablate(u, [0.5, -0.25])
         .affine(torch.rand(d) + 0.5, torch.randn(d))
         .add(torch.randn(3, d), torch.tensor([1.0, -0.5, 2.0]))
         .neurons([1, 4, 6], mul=[2.0, 0.5, -1.0], add=[0.1, 0.2, 0.3])
         .condition(torch.randn(d), threshold=-1e3, kind="projection")  # always holds, far from the edge
         .monitor(torch.randn(2, d)))
    b = (SteeringPlan(add=torch.randn(2, d), strength=1.5)
         .condition(torch.randn(d), threshold=0.0, kind="cosine", compare=">")
         .monitor(torch.randn(d)))
    return SteeringBank([a, b])


# --- gradcheck in fp64 of each op's registered backward -------------------------------------------

def test_gradcheck_steer():
    d = 6
    args = (_leaf(torch.randn(5, d)), _leaf(torch.randn(2, 3, d)), _leaf(torch.randn(2, 3)),
            _leaf(torch.tensor([0.5, 2.0])), _leaf(torch.rand(5)), torch.tensor([0, 1, -1, 1, 0]))
    _with_reference_kernel("steer", reference.steer, args)


@pytest.mark.parametrize("per_row_weights", [False, True])
def test_gradcheck_steer_program_every_part(per_row_weights):
    d, rows = 8, 6
    bank = _full_bank(d)
    prog = [t.double().requires_grad_(True) if t.is_floating_point() else t
            for t in bank.program(torch.device("cpu"), folded=not per_row_weights)]
    x = torch.randn(rows, d)
    # Plan 1's cosine condition must hold on some rows and not on others, away from its threshold.
    x[[1, 3]] = 2 * bank.plans[1].condition_vector + 0.1 * torch.randn(2, d)
    x[4] = -2 * bank.plans[1].condition_vector
    slot = torch.tensor([0, 1, 0, 1, 1, -1])
    gate = _leaf(torch.rand(rows) + 0.5)
    row_weights = _leaf(torch.randn(rows, bank.max_vectors)) if per_row_weights else None
    _with_reference_kernel("steer_program", reference.steer_program, (_leaf(x), *prog, gate, slot, row_weights))


def _away_from(t: float, shape) -> torch.Tensor:
    """Values whose magnitudes stay >= 0.1 from t (no finite-difference step crosses the kink)."""
    mag = torch.where(torch.rand(shape) < 0.5, t + 0.1 + torch.rand(shape), (t - 0.1) * torch.rand(shape))
    return mag * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)


def test_gradcheck_sparse_threshold():
    _with_reference_kernel("sparse_threshold", reference.sparse_threshold,
                           (_leaf(_away_from(0.5, (4, 10))), torch.tensor([0.5])))


def test_gradcheck_sparse_linear():
    x = _leaf(_away_from(0.3, (3, 10)))
    args = (x, _leaf(torch.randn(10, 7)), torch.full((10,), 0.3), _leaf(torch.randn(7)))
    _with_reference_kernel("sparse_linear", reference.sparse_linear, args)


@pytest.mark.parametrize("act, threshold, gated", [
    ("relu", 0.0, True), ("fatrelu", 0.3, True), ("relu2", 0.0, True), ("drelu", 0.0, True),
    ("cats", 0.1, True), ("relu", 0.0, False), ("fatrelu", 0.3, False)])
def test_gradcheck_relu_ffn(act, threshold, gated):
    d, ffn = 6, 12
    code = reference.SPARSE_ACTS.index(act)
    args = (_leaf(torch.randn(3, d)), _leaf(torch.randn(ffn, d)), _leaf(torch.randn(ffn, d)) if gated else None,
            _leaf(torch.randn(ffn, d)), code, threshold, _leaf(torch.randn(ffn)),
            _leaf(torch.randn(ffn)) if gated else None, _leaf(torch.randn(d)))

    def ref(x, wg, wu, wd, act_code, t, bg, bu, bd):
        return reference.relu_ffn(x, wg, wu, wd, reference.SPARSE_ACTS[act_code], t, bg, bu, bd)

    _with_reference_kernel("relu_ffn", ref, args)


# --- fp32: the kernel backends' gradients equal the reference backend's ---------------------------

def _grads(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves, backend=backend)
    y = y[0] if isinstance(y, tuple) else y
    (y.float().square() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [t.grad for t in leaves]


def _assert_same_grads(fn, inputs, backend):
    expected = _grads(fn, inputs, "reference")
    actual = _grads(fn, inputs, backend)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"input {i} got no gradient on {backend}"
        # The loss squares y, so the backends' fp32 forward round-off (1e-5) reaches the gradients.
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5 * float(e.abs().max()), msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_additive_grads(backend):
    plan = SteeringPlan(add=torch.randn(2, 16), weights=torch.tensor([1.0, -2.0]), strength=1.5)

    def fn(x, gate, *, backend):
        return actshift.steer(x, plan, gate=gate, backend=backend)

    _assert_same_grads(fn, [torch.randn(2, 3, 16), torch.rand(2, 3)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_program_grads(backend):
    bank = _full_bank(16)
    slot = torch.tensor([[0, 1, 1], [0, -1, 0]])

    def fn(x, gate, weights, *, backend):
        return actshift.steer(x, bank, slot=slot, gate=gate, weights=weights, return_monitors=True, backend=backend)

    x = torch.randn(2, 3, 16)
    x[0, 1] = 3 * bank.plans[1].condition_vector  # a row whose cosine condition holds
    _assert_same_grads(fn, [x, torch.rand(2, 3) + 0.5, torch.randn(2, 3, bank.max_vectors)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_monitor_grads(backend):
    plan = SteeringPlan(add=torch.randn(16)).monitor(torch.randn(3, 16))
    x = torch.randn(4, 16)
    grads = {}
    for b in ("reference", backend):
        xl = x.clone().requires_grad_(True)
        _, monitors = actshift.steer(xl, plan, return_monitors=True, backend=b)
        (monitors * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads[b] = xl.grad
    torch.testing.assert_close(grads[backend], grads["reference"], **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grads(backend):
    x, w, b = _away_from(0.4, (3, 24)), torch.randn(24, 10), torch.randn(10)
    _assert_same_grads(lambda x, w, b, backend: actshift.sparse_linear(x, w, 0.4, b, backend=backend),
                       [x, w, b], backend)
    _assert_same_grads(lambda x, backend: actshift.sparse_threshold(x, torch.full((24,), 0.4), backend=backend),
                       [x], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "fatrelu", "drelu", "cats"])
def test_relu_ffn_grads(backend, act):
    t = 0.2 if act in ("fatrelu", "cats") else 0.0
    inputs = [torch.randn(2, 3, 16), torch.randn(32, 16), torch.randn(32, 16), torch.randn(32, 16)]

    def fn(x, wg, wu, wd, *, backend):
        return actshift.relu_ffn(x, wg, wu, wd, act, t, backend=backend)

    _assert_same_grads(fn, inputs, backend)


def test_cats_mlp_grads():
    inputs = [torch.randn(3, 16), torch.randn(32, 16), torch.randn(32, 16), torch.randn(32, 16)]

    def fn(x, wg, wu, wd, *, backend):
        return actshift.cats_mlp(x, wg, wu, wd, 0.1, backend=backend)

    _assert_same_grads(fn, inputs, "cpu")


def test_grads_only_for_inputs_that_require_them():
    w = torch.randn(16, 8)  # frozen
    x = torch.randn(3, 16, requires_grad=True)
    actshift.sparse_linear(x, w, 0.1, backend="cpu").sum().backward()
    assert x.grad is not None and w.grad is None
    torch.testing.assert_close(x.grad, (x.abs() > 0.1).float() * w.sum(1))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_percentile_ops_refuse_backward(backend):
    z = torch.randn(4, 32, requires_grad=True)
    y = actshift.percentile_scale(z, 80, backend=backend)
    if backend == "reference":  # plain PyTorch: autograd through its ops
        y.sum().backward()
        return
    with pytest.raises(RuntimeError, match="percentile_scale.* is not differentiable"):
        y.sum().backward()
    q, c = actshift.adascale_stats(z, z + 0.1, 3, 8, backend=backend)
    with pytest.raises(RuntimeError, match="adascale_stats.* is not differentiable"):
        (q + c).sum().backward()
    with torch.no_grad():  # inference is unaffected
        torch.testing.assert_close(actshift.percentile_scale(z, 80, backend=backend),
                                   actshift.percentile_scale(z, 80, backend="reference"))


def test_double_backward_is_refused():
    x = torch.randn(3, 16, requires_grad=True)
    y = actshift.sparse_linear(x, torch.randn(16, 4), 0.1, backend="cpu")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=False)
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(actshift.sparse_linear(x, torch.randn(16, 4), 0.1, backend="cpu").square().sum(), x,
                            create_graph=True)


def test_patched_llama_trains_through_steering():
    """The embedding gradient of a patched tiny Llama in train mode: present on every backend and
    equal to the reference's."""
    from tiny_lm import llama

    grads = {}
    ids = torch.tensor([[3, 5, 7, 9], [4, 6, 8, 10]])
    for backend in ("reference", "cpu", "triton"):
        model = llama().train()
        d = model.config.hidden_size
        torch.manual_seed(7)
        plan = (SteeringPlan(add=torch.randn(d), strength=2.0).affine(torch.rand(d) + 0.5, torch.randn(d))
                .ablate(torch.nn.functional.normalize(torch.randn(d), dim=0)))
        with actshift.patch(model, steering={0: plan, 1: SteeringPlan(add=torch.randn(d))}, backend=backend):
            model(ids, labels=ids).loss.backward()
        grads[backend] = model.get_input_embeddings().weight.grad
        assert grads[backend] is not None, backend
    assert grads["reference"].abs().sum() > 0
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-4, atol=1e-5)


# --- in-place (out=): torch's rules ---------------------------------------------------------------

def _plans():
    additive = SteeringPlan(add=torch.randn(8), strength=2.0)
    return [additive, additive.affine(torch.rand(8) + 0.5, torch.randn(8))]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("kind", [0, 1], ids=["additive", "program"])
def test_out_bumps_the_version_so_backward_sees_the_overwrite(backend, kind):
    a = torch.randn(5, 8)
    b = torch.randn(5, 8, requires_grad=True)
    h = a * b  # saves a for b's gradient
    version = a._version
    actshift.steer(a, _plans()[kind], out=a, backend=backend)
    assert a._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


@pytest.mark.parametrize("op", ["steer_out", "steer_program_out"])
def test_raw_out_ops_follow_torch_rules(op):
    bank = SteeringBank(_plans())
    x = torch.randn(4, 8)
    slot = torch.tensor([0, 1, 1, 0])
    if op == "steer_out":
        args = (*SteeringBank([_plans()[0]] * 2).tensors(x.device), None, slot)
    else:
        args = (*bank.program(x.device), None, slot, None)
    fn = getattr(torch.ops.actshift, op)
    version = x._version
    fn(x, *args, x)
    assert x._version > version
    leaf = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="out=.*requires grad|leaf"):
        fn(leaf, *args, leaf)
    with pytest.raises(RuntimeError, match="requires grad"):
        fn(leaf, *args, torch.empty(4, 8))
    with torch.inference_mode():
        inf = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="inference"):
        fn(torch.randn(4, 8), *args, inf)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_out_refuses_what_torch_refuses(backend):
    plan = _plans()[1]
    leaf = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        actshift.steer(leaf, plan, out=leaf, backend=backend)
    with torch.no_grad():  # as torch allows leaf.add_(1) under no_grad
        expected = actshift.steer(leaf, plan, backend="reference")
        actshift.steer(leaf, plan, out=leaf, backend=backend)
    torch.testing.assert_close(leaf.detach(), expected)
    with torch.inference_mode():
        inf = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="inference"):
        actshift.steer(inf.clone(), plan, out=inf, backend=backend)
    with torch.inference_mode():
        actshift.steer(inf, plan, out=inf, backend=backend)  # allowed inside inference mode


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("kind", [0, 1], ids=["additive", "program"])
def test_out_with_autograd_matches_out_of_place(backend, kind):
    plan = _plans()[kind]
    x = torch.randn(5, 8, requires_grad=True)
    h = x * 1.5
    y = actshift.steer(h, plan, out=h, backend=backend)  # in place on a non-leaf that requires grad
    assert y is h
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    actshift.steer(x2 * 1.5, plan, backend="reference").square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **GRAD_TOL)


def test_opcheck_with_inputs_that_require_grad():
    """torch's own checks of the autograd registration (including AOT dispatch, i.e. torch.compile)."""
    d = 16
    x = torch.randn(4, d, requires_grad=True)
    w, b = torch.randn(d, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    ops = torch.ops.actshift
    torch.library.opcheck(ops.sparse_threshold.default, (x, torch.tensor([0.5])))
    torch.library.opcheck(ops.sparse_linear.default, (x, w, torch.tensor([0.5]), b))
    torch.library.opcheck(ops.relu_ffn.default, (x, torch.randn(32, d, requires_grad=True), torch.randn(32, d),
                                                 torch.randn(32, d, requires_grad=True), 1, 0.2, None, None, None))
    bank = _full_bank(d)
    prog = bank.program(torch.device("cpu"), folded=False)
    torch.library.opcheck(ops.steer_program.default, (x, *prog, torch.rand(4, requires_grad=True),
                                                      torch.tensor([0, 1, -1, 0]), torch.randn(4, 3, requires_grad=True)))
    torch.library.opcheck(ops.steer.default, (x, torch.randn(2, 3, d), torch.randn(2, 3, requires_grad=True),
                                              torch.ones(2), None, torch.tensor([1, 0, 1, -1])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_weights_are_differentiable_in_the_logits(backend):
    """The router op's weights carry gradients to the logits (Rewiring Experts trains router
    offsets through a patched model), equal to the reference backend's; indices have none."""
    from conftest import require_backend

    require_backend(backend, "cpu")
    from actshift.experts import ExpertPlan

    plan = ExpertPlan(8, offsets=torch.randn(8), off=[3], on=[6], strength=0.5)
    torch.manual_seed(0)
    base = torch.randn(5, 8)
    grads = {}
    for be in (backend, "reference"):
        logits = base.clone().requires_grad_(True)
        idx, w = actshift.route(logits, 2, plan, backend=be)
        (w * torch.arange(1.0, 3.0)).sum().backward()
        grads[be] = logits.grad
        assert idx.grad_fn is None
    assert grads[backend] is not None and grads[backend].abs().sum() > 0
    torch.testing.assert_close(grads[backend], grads["reference"], **GRAD_TOL)
