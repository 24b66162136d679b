"""Expert-steering recipes: MoTE attribution recovers an expert planted to fire on a marker token,
and its plan switches it off; router-offset plans from user vectors."""
import pytest
import torch
from moe_models import CONFIGS, tiny_moe

import actshift
from actshift.experts import recipes

MARKER, EXPERT = 77, 5


def planted_model():
    """Layer 0's router sends the marker token to EXPERT: the marker's embedding is a direction u
    that no other token's embedding has, and only the router row of EXPERT reads u. One expert
    per token (k = 1), so no other expert rides along with the planted one on every marker."""
    CONFIGS["k1"] = lambda: CONFIGS["mixtral"]().__class__(**{**CONFIGS["mixtral"]().to_dict(), "num_experts_per_tok": 1})
    model = tiny_moe("k1")
    del CONFIGS["k1"]
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(emb.shape[1]), dim=0)
        emb -= (emb @ u)[:, None] * u + u  # every token points away from u...
        emb[MARKER] = 4.0 * u  # ...but the marker
        gate = model.model.layers[0].mlp.gate
        gate.weight -= (gate.weight @ u)[:, None] * u  # the other experts do not read u
        gate.weight[EXPERT] = 20.0 * u
    return model


def prompts(with_marker: bool, n=4, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 70, (2, seq), generator=g)
        if with_marker:
            ids[:, ::2] = MARKER
        out.append(ids)
    return out


def test_attribution_recovers_the_planted_expert_and_its_plan_switches_it_off():
    model = planted_model()
    attr = recipes.attribute_experts(model, prompts(True), prompts(False, seed=1))
    # Deeper layers may route the (identical) marker tokens consistently too; the planted expert
    # leads layer 0.
    layer, expert, fb, fn, diff, wb, wn = [r for r in attr.rows if r[0] == 0][0]
    assert expert == EXPERT
    assert fb >= 0.5 and fn == 0.0 and wb > wn  # fires on every marker token (half the tokens), never else
    assert [r[4] for r in attr.rows] == sorted((r[4] for r in attr.rows), reverse=True)

    plan = attr.plan(1, "off", layers=[0])
    assert list(plan) == [0] and plan[0].off == (EXPERT,)
    with actshift.patch(model, experts=plan):
        stats = recipes.routing_stats(model, prompts(True))
    assert stats.counts[0][EXPERT] == 0 and stats.tokens == 4 * 2 * 10

    on = attr.plan(3, "on", layers=[0])
    assert on[0].on == (EXPERT,)  # k = 1: one forced expert per layer
    with actshift.patch(model, experts=on):
        stats = recipes.routing_stats(model, prompts(False))
    assert stats.counts[0][EXPERT] == stats.tokens  # forced on every token


def test_routing_stats_skip_padding():
    model = planted_model()
    ids = torch.full((1, 6), MARKER)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    stats = recipes.routing_stats(model, [{"input_ids": ids, "attention_mask": mask}])
    assert stats.tokens == 3 and int(stats.counts[0].sum()) == 3


def test_offset_plan_from_user_vectors():
    model = tiny_moe("olmoe")
    v = torch.zeros(8)
    v[2] = 50.0
    plans = recipes.offset_plan({1: v}, strength=0.5)
    assert plans[1].strength == 0.5 and torch.equal(plans[1].offsets, v)
    with actshift.patch(model, experts=plans):
        stats = recipes.routing_stats(model, prompts(False))
    assert stats.counts[1][2] == stats.tokens and stats.counts[0][2] < stats.tokens
    with pytest.raises(ValueError, match=r"vectors\[1\]"):
        recipes.offset_plan({1: torch.zeros(2, 8)})
