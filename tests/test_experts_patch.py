"""actshift.patch(model, experts=...) on tiny random MoE models of every family with a router in
the architecture table: equal to hand-written router hooks, switched-off experts never reach the
experts (counted at their input), per-row banks equal each request alone, generate() with a KV
cache, composition with steering=, and a bit-exact unpatch."""
import pytest
import torch
from conftest import require_backend
from moe_models import CONFIGS, tiny_moe

import actshift
from actshift import ExpertPlan, SteeringPlan

pytest.importorskip("transformers")

FAMILIES = list(CONFIGS)
E, K = 8, 2


def plan_for(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(E, generator=g) * 2
    if family == "deepseek_v3":  # forcing is covered by the op tests; here offsets and switch-off
        return ExpertPlan(E, offsets=offsets, off=[1, 6], strength=0.7)
    return ExpertPlan(E, offsets=offsets, off=[1, 6], on=[3], strength=0.7)


def hand_route(gate, logits, plan):
    """The edit written out in plain torch, after the router's own computation (the hook a user
    would write)."""
    z = logits.float() + plan.strength * plan.offsets
    off = torch.tensor(plan.off, dtype=torch.long)
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3, as its router, with off experts masked
        s = z.sigmoid()
        choice = (s + gate.e_score_correction_bias).index_fill(1, off, float("-inf"))
        groups = choice.view(-1, gate.num_group, E // gate.num_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(gate.topk_group, dim=-1)[1], 1)
        keep = keep.repeat_interleave(E // gate.num_group, dim=1).bool()
        idx = choice.masked_fill(~keep, float("-inf")).topk(K, dim=-1)[1]
        w = s.gather(1, idx)
        if gate.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return logits, w * gate.routed_scaling_factor, idx
    p = torch.softmax(z.index_fill(1, off, float("-inf")), dim=-1)
    forced = torch.tensor(plan.on, dtype=torch.long).expand(z.shape[0], len(plan.on))
    rest = p.index_fill(1, torch.tensor(plan.on + plan.off, dtype=torch.long), -1.0).topk(K - len(plan.on), -1)[1]
    idx = torch.cat([forced, rest], dim=1)
    w = p.gather(1, idx)
    if getattr(gate, "norm_topk_prob", True):  # Mixtral always renormalises
        w = w / w.sum(-1, keepdim=True)
    return logits, (w if type(gate).__name__.startswith("Mixtral") else w.to(logits.dtype)), idx


def hook_reference(model, plan):
    handles = []
    for block in model.model.layers:
        gate = block.mlp.gate
        handles.append(gate.register_forward_hook(lambda m, args, out: hand_route(m, out[0], plan)))
    return handles


def ids(batch=2, seq=6, seed=0):
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_hook_reference_and_unpatch_is_exact(family, backend):
    require_backend(backend, "cpu")
    model, x = tiny_moe(family), ids()
    with torch.no_grad():
        before = model(x).logits
        hooks = hook_reference(model, plan_for(family))
        want = model(x).logits
        for h in hooks:
            h.remove()
        handle = actshift.patch(model, experts=plan_for(family), backend=backend)
        got = model(x).logits
        assert not torch.allclose(want, before, atol=1e-3)  # the plan changes the routing
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        handle.unpatch()
        assert all("forward" not in b.mlp.gate.__dict__ for b in model.model.layers)
        assert torch.equal(model(x).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_switched_off_experts_are_never_selected(family):
    model, x = tiny_moe(family), ids(4, 12)
    counts = torch.zeros(len(model.model.layers), E, dtype=torch.long)

    def counter(i):
        def hook(module, args):
            counts[i] += torch.bincount(args[1].reshape(-1), minlength=E)
        return hook

    hooks = [b.mlp.experts.register_forward_pre_hook(counter(i)) for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(x)
        assert (counts[:, [1, 6]] > 0).any()  # the unpatched model uses them
        counts.zero_()
        with actshift.patch(model, experts=ExpertPlan(E, off=[1, 6])):
            model(x)
    assert (counts[:, [1, 6]] == 0).all() and counts.sum() == len(model.model.layers) * x.numel() * K
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_bank_with_slots_equals_each_request_alone(family):
    model, x = tiny_moe(family), ids(3, 5)
    plans = [plan_for(family, 0), {1: ExpertPlan(E, off=[0, 2, 4])}]
    with torch.no_grad():
        alone = []
        for r, spec in enumerate([plans[0], plans[1], None]):
            if spec is None:
                alone.append(model(x[r:r + 1]).logits)
                continue
            with actshift.patch(model, experts=spec):
                alone.append(model(x[r:r + 1]).logits)
        with actshift.patch(model, experts=plans) as handle:
            with pytest.raises(ValueError, match="set_slots"):
                model(x)
            handle.set_slots(torch.tensor([0, 1, -1]))
            mixed = model(x).logits
            handle.set_slots(torch.tensor([0, 2, -1]))
            with pytest.raises(ValueError, match="slot"):
                model(x)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_generate_with_kv_cache_matches_the_hook_reference(family):
    model, x = tiny_moe(family), ids(2, 4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hooks = hook_reference(model, plan_for(family))
        want = model.generate(x, **kw)
        for h in hooks:
            h.remove()
        with actshift.patch(model, experts=plan_for(family)):
            got = model.generate(x, **kw)
        with actshift.patch(model, experts=[plan_for(family), ExpertPlan(E)]) as handle:
            handle.set_slots(torch.tensor([0, 0]))
            banked = model.generate(x, **kw)
    assert torch.equal(got, want) and torch.equal(banked, want)


def test_composes_with_steering():
    model, x = tiny_moe("qwen2_moe"), ids()
    v = torch.randn(32)
    plan = plan_for("qwen2_moe")
    with torch.no_grad():
        hooks = hook_reference(model, plan)
        hooks.append(model.model.layers[1].register_forward_hook(lambda m, a, out: out + 3.0 * v))
        want = model(x).logits
        for h in hooks:
            h.remove()
        with actshift.patch(model, experts=plan, steering={1: SteeringPlan(add=v, strength=3.0)}):
            got = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_specs_name_the_argument():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="layer 0.*on forces 3 experts but the router picks only k=2|on forces 3"):
        actshift.patch(model, experts=ExpertPlan(E, on=[0, 1, 2]))
    with pytest.raises(ValueError, match="plan for layer 1 has 4 experts"):
        actshift.patch(model, experts={1: ExpertPlan(4)})
    with pytest.raises(ValueError, match="names layer 5"):
        actshift.patch(model, experts={5: ExpertPlan(E)})
    with pytest.raises(TypeError, match="experts"):
        actshift.patch(model, experts="off")
    assert all("forward" not in b.mlp.gate.__dict__ for b in model.model.layers)  # nothing left behind
    dense = __import__("transformers").LlamaForCausalLM(__import__("transformers").LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no MoE router"):
        actshift.patch(dense, experts=ExpertPlan(E))
