"""The patch layer finds the KV cache however a transformers release passes it.

transformers 5.24 renamed generate()'s cache argument from `past_key_values=` to `cache=` and
stopped passing `cache_position`; the patch layer reads none of those names blindly. These tests
name the assumption (generate() passes a transformers Cache under one of CACHE_NAMES) and cover
each calling convention: each keyword, positional, `cache_position` alone, and unknown ones, which
must raise rather than steer the wrong tokens.
"""
import inspect
import warnings

import pytest
import torch

import actshift
from actshift.integrations import transformers as integ

T = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

D = 32


def tiny(seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    return T.LlamaForCausalLM(config).eval()


def cache_params(model) -> list[str]:
    """The installed release's cache parameters of the model's forward, among CACHE_NAMES."""
    params = inspect.signature(model.forward).parameters
    return [name for name in integ.CACHE_NAMES if name in params]


def record_steps(handle) -> list[tuple[int, int | None]]:
    seen = []
    handle.on_step(lambda h, step: seen.append((step.past_length, step.prompt_length)))
    return seen


def test_generate_passes_the_cache_under_a_known_name():
    """The assumption itself: the installed generate() hands the model a Cache under CACHE_NAMES,
    and the forward declares one of them. A release that renames it fails here first."""
    model = tiny()
    assert cache_params(model), f"forward takes none of {integ.CACHE_NAMES}: {list(inspect.signature(model.forward).parameters)}"
    names = []
    fwd = model.forward

    def spy(*args, **kwargs):
        names.append(sorted(k for k, v in kwargs.items() if isinstance(v, T.cache_utils.Cache)))
        return fwd(*args, **kwargs)

    model.forward = spy
    ids = torch.tensor([[5, 6, 7, 8]])
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    del model.forward
    assert len(names) == 3 and all(len(n) == 1 and n[0] in integ.CACHE_NAMES for n in names), names


def test_generate_steps_see_the_cached_length():
    model = tiny()
    plan = actshift.SteeringPlan(add=torch.randn(D), strength=2.0)
    with actshift.patch(model, steering=actshift.SteeringSite(plan, positions="generated")) as handle:
        seen = record_steps(handle)
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen == [(0, None), (4, 4), (5, 4), (6, 4)]


def _decode_step(model, handle, call):
    """Prefill 4 tokens, then one decode step made by `call(model, token, cache)`; returns its logits
    and the past length the handle saw."""
    seen = record_steps(handle)
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = DynamicCache(config=model.config)
    kw = {cache_params(model)[0]: cache}
    with torch.no_grad():
        model(ids, use_cache=True, **kw)
        logits = call(model, torch.tensor([[9]]), cache).logits[:, -1]
    return logits, seen[-1][0]


def _expected(model, plan):
    """The same decode step recomputed without a cache, prompt length pinned."""
    with actshift.patch(model, steering=actshift.SteeringSite(plan, positions="generated")) as handle:
        handle.set_prompt_length(4)
        with torch.no_grad():
            return model(torch.tensor([[5, 6, 7, 8, 9]]), use_cache=False).logits[:, -1]


def _conventions(model):
    params = list(inspect.signature(model.forward).parameters)
    out = {}
    for name in cache_params(model):
        out[f"{name}="] = lambda m, tok, cache, name=name: m(tok, use_cache=True, **{name: cache})
        # positional: input_ids first, then every parameter up to the cache, all None
        index = params.index(name)
        out[f"{name} positional"] = lambda m, tok, cache, index=index: m(tok, *([None] * (index - 1)), cache, use_cache=True)
    return out


@pytest.mark.parametrize("convention", list(_conventions(tiny())))
def test_each_calling_convention_steers_the_right_tokens(convention):
    model = tiny()
    plan = actshift.SteeringPlan(add=torch.randn(D), strength=3.0)
    expected = _expected(model, plan)
    call = _conventions(model)[convention]
    with actshift.patch(model, steering=actshift.SteeringSite(plan, positions="generated")) as handle:
        logits, past = _decode_step(model, handle, call)
    assert past == 4
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    unsteered = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[:, -1]
    assert not torch.allclose(logits, unsteered, atol=1e-3)  # the generated token was steered


def test_past_key_values_keyword_is_read_where_the_release_accepts_it():
    """`past_key_values=` is what releases before 5.24 pass (and 5.24 still accepts, deprecated)."""
    model = tiny()
    handle = actshift.patch(model, steering=actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D)),
                                                                  positions="generated"))
    seen = record_steps(handle)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated from 5.24 on
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        model(torch.tensor([[8]]), past_key_values=cache, use_cache=True)
    assert [p for p, _ in seen] == [0, 3]


def test_a_cache_under_an_unknown_name_is_found_by_type():
    finder = integ.PastLength(lambda input_ids, **kwargs: None)
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), layer_idx=0)
    assert finder((), {"kv_state": cache}) == 6
    assert finder((), {"cache": cache}) == 6
    assert finder((), {"past_key_values": cache, "cache": None}) == 6
    assert finder((), {"cache_position": torch.tensor([7, 8])}) == 7
    assert finder((), {}) == 0


def test_unknown_conventions_raise_instead_of_guessing():
    finder = integ.PastLength(lambda input_ids, cache=None, **kwargs: None)
    legacy = ((torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)),)
    with pytest.raises(TypeError, match="not a transformers Cache"):
        finder((), {"cache": legacy})
    with pytest.raises(TypeError, match="not a transformers Cache"):
        finder((None, legacy), {})  # positional
    with pytest.raises(TypeError, match="past_states="):
        finder((), {"past_states": legacy})
    # flags and positions that merely look like a cache are not one
    assert finder((), {"use_cache": True, "cache_implementation": "static"}) == 0


def test_patched_forward_raises_on_an_unknown_cache_convention():
    model = tiny()
    actshift.patch(model, steering=actshift.SteeringSite(actshift.SteeringPlan(add=torch.randn(D)), positions="prompt"))
    with pytest.raises(TypeError, match="cannot tell which tokens are cached"):
        model(torch.tensor([[5, 6]]), past_states=((torch.zeros(1),),))
    actshift.unpatch(model)
