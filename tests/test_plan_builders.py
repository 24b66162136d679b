"""SteeringPlan builders own their tensors, check values after the fp32 cast, keep neuron indices
exact and do not depend on torch's default dtype (issue 14, items 8 and 9)."""
import pytest
import torch

import actshift
from actshift import SteeringPlan

D = 8


def _parts():
    """Fresh fp32 CPU contiguous tensors for every builder (what a plan could alias)."""
    torch.manual_seed(3)
    u = torch.linalg.qr(torch.randn(D, 2)).Q.t().contiguous()
    return dict(add=torch.randn(2, D), weights=torch.tensor([1.0, -0.5]), directions=u,
                targets=torch.tensor([0.3, -0.2]), scale=torch.rand(D) + 0.5, bias=torch.randn(D),
                idx=torch.tensor([1, 5]), mul=torch.tensor([2.0, -1.0]), nadd=torch.tensor([0.5, 0.25]),
                cond=torch.randn(D), monitor=torch.randn(3, D))


def _plan(p):
    return (SteeringPlan(add=p["add"], weights=p["weights"], strength=1.5)
            .ablate(p["directions"], p["targets"])
            .affine(p["scale"], p["bias"])
            .neurons(p["idx"], p["mul"], p["nadd"])
            .condition(p["cond"], threshold=-1e3, kind="projection")
            .monitor(p["monitor"]))


ATTRS = ("vectors", "weights", "directions", "targets", "scale", "bias", "neuron_idx", "neuron_mul",
         "neuron_add", "condition_vector", "monitors")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_plan_copies_the_callers_tensors(backend):
    parts = _parts()
    plan, clean = _plan(parts), _plan(_parts())
    x = torch.randn(4, D)
    for t in parts.values():  # the caller reuses its buffers; NaN would also dodge the finite check
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0)
    for name in ATTRS:
        assert torch.equal(getattr(plan, name), getattr(clean, name)), name
    y, m = actshift.steer(x, plan, return_monitors=True, backend=backend)
    y_clean, m_clean = actshift.steer(x, clean, return_monitors=True, backend=backend)
    torch.testing.assert_close(y, y_clean)
    torch.testing.assert_close(m, m_clean)


@pytest.mark.parametrize("build", [
    lambda big: SteeringPlan(add=big),
    lambda big: SteeringPlan(add=torch.ones(D), weights=big[:1]),
    lambda big: SteeringPlan().affine(big),
    lambda big: SteeringPlan().affine(bias=big),
    lambda big: SteeringPlan().condition(big, kind="projection"),
    lambda big: SteeringPlan().monitor(big),
    lambda big: SteeringPlan(add=torch.ones(D)).neurons([0, 1], mul=big[:2]),
    lambda big: SteeringPlan(add=torch.ones(D)).ablate(torch.eye(D)[:2], targets=big[:2]),
], ids=["add", "weights", "scale", "bias", "condition", "monitor", "neuron_mul", "targets"])
def test_values_beyond_fp32_are_rejected(build):
    big = torch.full((D,), 1e300, dtype=torch.float64)
    big[1:] = 1.0
    with pytest.raises(ValueError, match="NaN or Inf|float32"):
        build(big)


@pytest.mark.parametrize("build", [
    lambda: SteeringPlan(add=torch.ones(D), strength=1e300),
    lambda: SteeringPlan(add=torch.ones(D)).neurons([0], add=1e300),
    lambda: SteeringPlan().condition(torch.ones(D), threshold=-1e300, kind="projection"),
    lambda: SteeringPlan(add=[1e300] + [0.0] * (D - 1)),
])
def test_numbers_beyond_fp32_are_rejected(build):
    with pytest.raises(ValueError, match="float32"):
        build()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_neuron_index_above_2_pow_24_is_exact(backend):
    d = 2**24 + 2
    target = 2**24 + 1  # 16777217 has no fp32 representation: it rounds to 16777216
    plan = SteeringPlan(add=torch.zeros(d)).neurons([target, 3], mul=1.0, add=5.0)
    y = actshift.steer(torch.zeros(1, d), plan, backend=backend)
    assert y[0, target] == 5.0 and y[0, target - 1] == 0.0 and y[0, 3] == 5.0
    assert int((y != 0).sum()) == 2


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_builders_ignore_the_default_dtype(backend):
    x = torch.randn(5, D)
    parts = _parts()  # made under the fp32 default: randn draws other numbers under fp64
    expected = actshift.steer(x, _plan(parts), backend=backend)
    additive = actshift.steer(x, SteeringPlan(add=torch.ones(D)), backend=backend)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        plan = _plan(parts)
        for t in (plan.vectors, plan.weights, plan.targets, plan.scale, plan.neuron_mul, plan.monitors):
            assert t.dtype == torch.float32
        y = actshift.steer(x, plan, backend=backend)
        y_add = actshift.steer(x, SteeringPlan(add=[1.0] * D, strength=1.0), backend=backend)
        y_num = actshift.steer(x, SteeringPlan(add=torch.ones(D)).neurons([2], mul=3.0).affine(bias=[0.5] * D),
                               backend=backend)
    finally:
        torch.set_default_dtype(prev)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y_add, additive)
    ref = x + 1.0 + 0.5
    ref[:, 2] *= 3.0
    torch.testing.assert_close(y_num, ref)
