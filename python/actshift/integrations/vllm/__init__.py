"""actshift as a vLLM plugin: per-request steering inside stock vLLM (no fork).

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process (front end,
engine core, each worker). It wraps three vLLM functions, each of which does nothing unless the
engine's `additional_config` holds an "actshift" entry (see `config`):
  * the model loader: after loading, the decoder layers are swapped for steered subclasses and the
    configured plans are loaded (worker.install), before vLLM warms up or compiles the model;
  * the model runner's `_prepare_inputs`: each step fills the token -> plan/strength buffers;
  * the front end's `InputProcessor.process_inputs`: it rejects bad steering arguments with a
    per-request ValueError and gives steered requests a prefix-cache salt of their own.
"""
from __future__ import annotations

import functools

from . import config as _config
from . import plans as _plans
from .worker import WorkerExtension

SUPPORTED = ("0.32.",)  # vLLM releases whose internals the wrappers were written against
__all__ = ["register", "add_plans", "WorkerExtension", "SUPPORTED"]

_VERSIONS: dict[str, int] = {}  # front end: plan name -> version (bumped on every replacement)


def _frontend_names(cfg: dict) -> dict[str, int]:
    names = {name: 0 for name in cfg["plans"]}
    names.update(_VERSIONS)
    return names


def _wrap_process_inputs(process_inputs):
    from vllm.exceptions import VLLMValidationError

    # A ValueError (the contract for bad input) that vLLM's server also answers with HTTP 400.
    request_error = type("SteeringRequestError", (VLLMValidationError, ValueError), {})

    @functools.wraps(process_inputs)
    def wrapper(self, request_id, prompt, params, *args, **kwargs):
        cfg = _config.engine_config(self.vllm_config)
        if cfg is None or not hasattr(params, "extra_args"):
            return process_inputs(self, request_id, prompt, params, *args, **kwargs)
        names = _frontend_names(cfg)
        try:
            choice = _config.request_choice(params.extra_args, names, cfg["max_strength"])
        except ValueError as e:
            raise request_error(str(e), parameter="extra_args") from None
        request = process_inputs(self, request_id, prompt, params, *args, **kwargs)
        if choice is not None:
            name, strength = choice
            request.cache_salt = _config.cache_salt(request.cache_salt, name, names[name], strength)
        return request

    return wrapper


def _wrap_load_model(load_model, supported: bool):
    @functools.wraps(load_model)
    def wrapper(self, vllm_config, model_config, *args, **kwargs):
        cfg = _config.engine_config(vllm_config)
        if cfg is not None and not supported:
            import vllm

            raise RuntimeError(f"actshift steering supports vLLM {', '.join(v + 'x' for v in SUPPORTED)}; "
                               f"this is vLLM {vllm.__version__}")
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        if cfg is not None and supported:
            from . import worker

            if worker.STATE is None:  # the target model (a draft model loads after it)
                worker.install(model, vllm_config, cfg)
        return model

    return wrapper


def register() -> None:
    """The vLLM general-plugin entry point. Idempotent (vLLM may call it more than once)."""
    import vllm
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader.load_model, "_actshift", False):
        return
    supported = vllm.__version__.startswith(SUPPORTED)
    BaseModelLoader.load_model = _wrap_load_model(BaseModelLoader.load_model, supported)
    BaseModelLoader.load_model._actshift = True
    if not supported:  # configured engines fail at load time; unconfigured ones are left alone
        return
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .worker import prepare_inputs_hook

    InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)
    GPUModelRunner._prepare_inputs = prepare_inputs_hook(GPUModelRunner._prepare_inputs)


def add_plans(llm, plans: dict) -> list[str]:
    """Adds or replaces named plans on every worker of an `LLM` (all tensor/pipeline ranks) and
    returns the names now loaded. Each value is a SteeringPlan (every layer), {layer: SteeringPlan
    or vector}, or a file path (actshift safetensors or GGUF). The engine needs
    `additional_config={"actshift": {...}}` and
    `worker_extension_cls="actshift.integrations.vllm.WorkerExtension"`. A replaced plan gets a new
    prefix-cache salt, so its requests never reuse blocks computed with the old one.
    """
    vllm_config = llm.llm_engine.vllm_config
    if _config.engine_config(vllm_config) is None:
        raise ValueError("llm: actshift steering is not configured; pass additional_config={'actshift': {}}")
    ext = vllm_config.parallel_config.worker_extension_cls
    if ext not in ("actshift.integrations.vllm.WorkerExtension", "actshift.integrations.vllm.worker.WorkerExtension"):
        raise ValueError("llm: pass worker_extension_cls='actshift.integrations.vllm.WorkerExtension' to LLM(...) "
                         "to change plans at run time")
    if not isinstance(plans, dict) or not plans:
        raise TypeError("plans must be a non-empty dict {name: plan}")
    hf = vllm_config.model_config.hf_text_config
    layer_plans = {_config.check_name(name): _plans.as_layer_plans(value, hf.num_hidden_layers, hf.hidden_size,
                                                                  f"plans[{name!r}]")
                   for name, value in plans.items()}
    names = llm.collective_rpc("actshift_set_plans", args=(_plans.encode(layer_plans),))[0]
    for name in layer_plans:
        _VERSIONS[name] = _VERSIONS.get(name, 0) + 1
    return names
