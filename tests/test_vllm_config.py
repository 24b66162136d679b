"""The vLLM plugin's request arguments, configuration, salts and plan transport (no vLLM needed)."""
import math

import pytest
import torch

import actshift
from actshift.integrations.vllm import config, plans

NAMES = {"happy": 0, "calm": 2}


def test_request_choice():
    assert config.request_choice(None, NAMES, 100) is None
    assert config.request_choice({"other_ext": 1}, NAMES, 100) is None
    assert config.request_choice({"actshift_plan": "happy"}, NAMES, 100) == ("happy", 1.0)
    assert config.request_choice({"actshift_plan": "calm", "actshift_strength": -2}, NAMES, 100) == ("calm", -2.0)
    assert config.request_choice({"actshift_plan": "calm", "actshift_strength": "0.5"}, NAMES, 100) == ("calm", 0.5)
    assert config.request_choice({"actshift_plan": "calm", "actshift_strength": 0}, NAMES, 100) is None


@pytest.mark.parametrize("extra,match", [
    ({"actshift_plan": "sad"}, "unknown steering plan 'sad'"),
    ({"actshift_plan": ["happy"]}, "plan name"),
    ({"actshift_plan": "happy", "actshift_strength": math.inf}, "finite"),
    ({"actshift_plan": "happy", "actshift_strength": 101}, "within"),
    ({"actshift_plan": "happy", "actshift_strength": True}, "number"),
    ({"actshift_plan": "happy", "actshift_strength": "x"}, "number"),
    ({"actshift_strength": 1.0}, "without"),
    ({"actshift_plan": "happy", "actshift_layer": 3}, "unknown actshift key"),
    ("happy", "dict"),
])
def test_request_choice_rejects(extra, match):
    with pytest.raises(ValueError, match=match):
        config.request_choice(extra, NAMES, 100)


def test_cache_salt_separates_plan_version_strength_and_salt():
    salts = {config.cache_salt(s, n, v, k) for s in (None, "u") for n in ("a", "b") for v in (0, 1) for k in (1.0, 2.0)}
    assert len(salts) == 16
    assert config.cache_salt(None, "a", 0, 1.0) == config.cache_salt(None, "a", 0, 1.0)


class _Cfg:
    def __init__(self, extra):
        self.additional_config = extra


def test_engine_config():
    assert config.engine_config(_Cfg({})) is None
    assert config.engine_config(_Cfg({"other": 1})) is None
    cfg = config.engine_config(_Cfg({"actshift": {"plans": {"a": "a.safetensors"}, "max_plans": 8}}))
    assert cfg["max_plans"] == 8 and cfg["max_strength"] == 100.0 and cfg["plans"] == {"a": "a.safetensors"}
    with pytest.raises(ValueError, match="unknown key"):
        config.engine_config(_Cfg({"actshift": {"plan": {}}}))
    with pytest.raises(ValueError, match="max_plans"):
        config.engine_config(_Cfg({"actshift": {"max_plans": 0}}))
    with pytest.raises(ValueError, match="max_plans"):
        config.engine_config(_Cfg({"actshift": {"plans": {"a": "x", "b": "y"}, "max_plans": 1}}))
    with pytest.raises(TypeError, match="path"):
        config.engine_config(_Cfg({"actshift": {"plans": {"a": 3}}}))


def test_layer_plans_from_files_and_transport(tmp_path):
    from actshift.steering import formats

    d = 8
    v = {1: torch.randn(d), 3: torch.randn(2, d)}
    formats.save(tmp_path / "v.safetensors", v)
    lp = plans.as_layer_plans(str(tmp_path / "v.safetensors"), 4, d, "v")
    assert sorted(lp) == [1, 3] and torch.equal(lp[3].vectors, v[3])
    formats.export_gguf(tmp_path / "v.gguf", {2: v[1]}, model_hint="llama")
    assert torch.equal(plans.as_layer_plans(str(tmp_path / "v.gguf"), 4, d, "g")[2].vectors[0], v[1])
    ablate = actshift.SteeringPlan(strength=0.5).ablate(torch.eye(d)[:2]).add(torch.ones(d))
    every = plans.as_layer_plans(ablate, 4, d, "p", layers=[0, 2])
    assert sorted(every) == [0, 2]
    back = plans.decode(plans.encode({"p": every, "v": lp}))
    x = torch.randn(5, d)
    for name, src in (("p", every), ("v", lp)):
        for layer, plan in src.items():
            torch.testing.assert_close(actshift.steer(x, back[name][layer]), actshift.steer(x, plan), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        plans.as_layer_plans({4: torch.randn(d)}, 4, d, "p")
    with pytest.raises(ValueError, match="hidden size"):
        plans.as_layer_plans({0: torch.randn(d + 1)}, 4, d, "p")
    with pytest.raises(TypeError, match="SteeringPlan"):
        plans.as_layer_plans(3.0, 4, d, "p")
