"""Worker side of the vLLM plugin: the plan banks, the per-step token -> slot buffers, the steered
decoder layers and the worker extension that changes plans at run time.

Each worker process (every tensor- and pipeline-parallel rank) holds one `Steering`. The decoder
layers call the opaque op `actshift::vllm_steer_(hidden, residual, layer)`, which torch.compile keeps
as one extern call and which reads the current banks and buffers when it runs, so new plans and new
per-request choices need no recompile. The buffers are allocated once at load time and updated in
place (CUDA-graph safe: a captured graph reads their current contents).

vLLM's Llama-family layer returns (hidden, residual) and the next layer's fused add-RMSNorm forms
the residual stream as hidden + residual. An additive bank adds to `hidden` (the stream gains the
same vector; unsteered rows are untouched, so bit-exact in every dtype); any other plan kind needs
the stream itself: hidden <- hidden + residual, steered in place, and residual <- 0, which the next
add-norm (or the final norm) turns back into the same stream.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ...ops.steer import runner
from ...steering.plan import SteeringBank
from .. import architectures
from . import config as cfg_mod
from . import plans as plans_mod

logger = logging.getLogger("actshift.vllm")

STATE: Steering | None = None  # this process's steering (None: not configured, or no model loaded)


class Steering:
    """Plans, banks and per-step buffers of one worker."""

    def __init__(self, num_layers: int, hidden: int, device: torch.device, max_tokens: int, config: dict):
        self.num_layers, self.hidden, self.device = num_layers, hidden, device
        self.max_plans, self.max_strength, self.backend = config["max_plans"], config["max_strength"], config["backend"]
        self.names: dict[str, int] = {}
        self.plans: list[plans_mod.LayerPlans] = []
        # table[layer, plan id] = the plan's row in that layer's bank (-1: the plan skips the layer);
        # the extra last column answers plan id -1 (unsteered) with -1.
        self.table = np.full((num_layers, self.max_plans + 1), -1, dtype=np.int32)
        self.runs: list[tuple | None] = [None] * num_layers  # (kernel call, additive) per layer
        self.slots = torch.full((num_layers, max_tokens), -1, dtype=torch.int32, device=device)
        self.gate = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        self._slots_host = torch.full((num_layers, max_tokens), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._gate_host = torch.zeros(max_tokens, dtype=torch.float32, pin_memory=device.type == "cuda")
        self.active = False  # whether any token of the current step is steered
        self._filled = 0  # tokens written by the last steered step
        self._choices: dict[str, tuple[int, float]] = {}  # request id -> (plan id, strength)

    # --- control plane ---------------------------------------------------------------------------

    def set_plans(self, new: dict[str, plans_mod.LayerPlans]) -> list[str]:
        """Adds or replaces named plans (validated before anything changes); returns all names."""
        fresh = [n for n in new if n not in self.names]
        if len(self.plans) + len(fresh) > self.max_plans:
            raise ValueError(f"plans: {len(self.plans) + len(fresh)} plans exceed max_plans={self.max_plans}")
        for name, layer_plans in new.items():
            cfg_mod.check_name(name)
            for layer, plan in layer_plans.items():
                if not 0 <= layer < self.num_layers:
                    raise ValueError(f"plan {name!r}: layer {layer} out of range for {self.num_layers} layers")
                if plan.hidden_size not in (None, self.hidden):
                    raise ValueError(f"plan {name!r}: hidden size {plan.hidden_size}, the model's is {self.hidden}")
        touched = set()
        for name, layer_plans in new.items():
            pid = self.names.get(name)
            if pid is None:
                pid = self.names[name] = len(self.plans)
                self.plans.append(layer_plans)
            else:
                touched.update(self.plans[pid])
                self.plans[pid] = layer_plans
            touched.update(layer_plans)
        for layer in sorted(touched):
            self._rebuild(layer)
        self._choices.clear()
        return list(self.names)

    def _rebuild(self, layer: int) -> None:
        ids = [pid for pid, lp in enumerate(self.plans) if layer in lp]
        self.table[layer, :-1] = -1
        if not ids:
            self.runs[layer] = None
            return
        self.table[layer, ids] = np.arange(len(ids), dtype=np.int32)
        bank = SteeringBank([self.plans[pid][layer] for pid in ids])
        kind = "add" if bank.is_additive else "program"
        self.runs[layer] = (runner(bank, self.device, self.backend, kind), bank.is_additive)

    # --- per step --------------------------------------------------------------------------------

    def _choice(self, req_id: str, request) -> tuple[int, float]:
        choice = self._choices.get(req_id)
        if choice is None:
            params = getattr(request, "sampling_params", None)
            try:
                picked = cfg_mod.request_choice(getattr(params, "extra_args", None), self.names, self.max_strength)
            except ValueError as e:  # the front end rejects these; a plan removed meanwhile lands here
                logger.warning("actshift: request %s is served unsteered: %s", req_id, e)
                picked = None
            choice = (-1, 0.0) if picked is None else (self.names[picked[0]], picked[1])
            self._choices[req_id] = choice
        return choice

    def fill(self, model_runner, counts: np.ndarray) -> None:
        """Writes this step's token -> slot (per layer) and token -> strength buffers from the
        batch's requests, laid out request by request as vLLM lays out the tokens."""
        batch = model_runner.input_batch
        num_reqs = batch.num_reqs
        if not self.plans or num_reqs == 0:
            self.active = False
            return
        requests = model_runner.requests
        picked = [self._choice(rid, requests.get(rid)) for rid in batch.req_ids[:num_reqs]]
        if len(self._choices) > 4 * num_reqs + 256:  # forget finished requests
            self._choices = {rid: c for rid, c in self._choices.items() if rid in requests}
        ids = np.fromiter((p for p, _ in picked), dtype=np.int64, count=num_reqs)
        self.active = bool((ids >= 0).any())
        if not self.active:
            return
        counts = counts[:num_reqs]
        n = int(counts.sum())
        token_ids = np.repeat(ids, counts)
        slots = torch.from_numpy(self.table[:, token_ids])
        gate = torch.from_numpy(np.repeat(np.fromiter((s for _, s in picked), dtype=np.float32, count=num_reqs), counts))
        end = max(n, self._filled)  # clear what the last step wrote past this one (padding rows stay -1)
        self._slots_host[:, :n].copy_(slots)
        self._slots_host[:, n:end].fill_(-1)
        self._gate_host[:n].copy_(gate)
        non_blocking = self.device.type == "cuda"
        self.slots[:, :end].copy_(self._slots_host[:, :end], non_blocking=non_blocking)
        self.gate[:n].copy_(self._gate_host[:n], non_blocking=non_blocking)
        self._filled = n

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        entry = self.runs[layer]
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if entry is None or not (self.active or capturing):
            return
        run, additive = entry
        rows = hidden.shape[0]
        x = hidden.view(rows, hidden.shape[-1])
        if not additive:  # the full program reads the residual stream itself
            x.add_(residual.view(rows, -1))
            residual.zero_()
        slot, gate = self.slots[layer, :rows], self.gate[:rows]
        if additive:
            run(x, gate, slot, x, True)
        else:
            run(x, gate, slot, x, True, None)


@torch.library.custom_op("actshift::vllm_steer_", mutates_args=("hidden", "residual"))
def vllm_steer_(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """Steers the residual stream (hidden + residual) after decoder layer `layer` in place, each token
    by its request's plan and strength (see the module docstring)."""
    if STATE is not None:
        STATE.apply(hidden, residual, layer)


@vllm_steer_.register_fake
def _(hidden, residual, layer):
    return None


_STEERED_CLASSES: dict[type, type] = {}


def _steered_class(cls: type) -> type:
    """A subclass of a vLLM decoder layer whose forward steers its output (same parameters, so
    weight loading and state dict names are unchanged)."""
    sub = _STEERED_CLASSES.get(cls)
    if sub is None:
        def forward(self, *args, **kwargs):
            hidden, residual = cls.forward(self, *args, **kwargs)
            torch.ops.actshift.vllm_steer_(hidden, residual, self.actshift_layer)
            return hidden, residual

        sub = _STEERED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return sub


def install(model: torch.nn.Module, vllm_config, config: dict) -> Steering:
    """Wraps the loaded model's decoder layers and builds this process's Steering with the plans of
    the configuration. Runs at load time, before vLLM warms up or compiles the model."""
    global STATE
    if vllm_config.use_v2_model_runner:
        raise RuntimeError("actshift's vLLM plugin supports the V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0")
    hf = vllm_config.model_config.hf_text_config
    arch = architectures.BY_MODEL_TYPE.get(hf.model_type)
    if arch is None or arch.vllm != "hidden_residual":
        supported = sorted(t for a in architectures.ARCHITECTURES if a.vllm for t in a.model_types)
        raise ValueError(f"actshift: model type {hf.model_type!r} is not supported in vLLM; supported: {', '.join(supported)}")
    blocks = architectures.blocks(model, arch)
    num_layers, hidden = hf.num_hidden_layers, hf.hidden_size
    device = next(model.parameters()).device
    max_tokens = max(vllm_config.scheduler_config.max_num_batched_tokens,
                     vllm_config.compilation_config.max_cudagraph_capture_size or 0)
    state = Steering(num_layers, hidden, device, max_tokens, config)
    state.set_plans({name: plans_mod.from_config(spec, num_layers, hidden, name)
                     for name, spec in config["plans"].items()})
    for index, block in enumerate(blocks):
        if type(block).__name__ == "PPMissingLayer":  # another pipeline stage's layer
            continue
        block.actshift_layer = index
        block.__class__ = _steered_class(type(block))
    STATE = state
    logger.info("actshift: steering %d decoder layers, %d plan(s) loaded", len(blocks), len(state.plans))
    return state


def prepare_inputs_hook(prepare):
    """Wraps GPUModelRunner._prepare_inputs (the CPU runner inherits it): after vLLM has laid out the
    step's batch, fill the steering buffers from the same layout."""
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens_np, *args, **kwargs):
        out = prepare(self, scheduler_output, num_scheduled_tokens_np, *args, **kwargs)
        if STATE is not None:
            STATE.fill(self, num_scheduled_tokens_np)
        return out

    _prepare_inputs.__wrapped__ = prepare
    return _prepare_inputs


class WorkerExtension:
    """vLLM worker extension (`worker_extension_cls="actshift.integrations.vllm.WorkerExtension"`):
    methods that `LLM.collective_rpc` runs on every rank. Use `actshift.integrations.vllm.add_plans`."""

    def actshift_set_plans(self, payload: dict) -> list[str]:
        if STATE is None:
            raise RuntimeError("actshift steering is not configured in this engine: pass "
                               "additional_config={'actshift': {}} (plans may be empty)")
        if STATE.device.type == "cuda" and not self.vllm_config.model_config.enforce_eager:
            raise RuntimeError("actshift: plans can change at run time only without CUDA graphs "
                               "(enforce_eager=True): captured graphs keep the banks of startup")
        return STATE.set_plans(plans_mod.decode(payload))
