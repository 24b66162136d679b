"""Autograd for the kernel ops (C++ and Triton), and torch's in-place rules for their out= forms.

Every backward recomputes the op's pure-PyTorch reference (reference.py, the contract) under
enable_grad on the saved inputs and differentiates it: one formula source, so a gradient cannot
drift from what the forward computes. The recompute costs one reference forward per backward,
which is what training pays anyway; inference never runs it.

The registered autograd kernel is Python: through it a small op costs ~10 µs of host time even
under no_grad, against ~3 µs for the C++ op before (torch 2.13, CPU, sparse_threshold [1, 64]).
`call` therefore runs the op below the autograd key whenever no gradient can be needed (~4.6 µs),
so only calls that build a graph pay it; direct torch.ops calls always get the registered formula.
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import SPARSE_ACTS

_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _relu_ffn_reference(x, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up, b_down):
    return reference.relu_ffn(x, w_gate, w_up, w_down_t, SPARSE_ACTS[act], threshold, b_gate, b_up, b_down)


# The op's argument order is the reference's (relu_ffn takes its act as the schema's int code).
_REFERENCE = {
    "steer": reference.steer,
    "steer_program": reference.steer_program,
    "sparse_threshold": reference.sparse_threshold,
    "sparse_linear": reference.sparse_linear,
    "relu_ffn": _relu_ffn_reference,
    "route": reference.route,  # the routing weights are differentiable in the logits; indices are not
}
# Ops without a gradient: a backward through them raises instead of leaving None.
_NO_BACKWARD = {
    "percentile_scale": "its per-row top-k selection (ASH/SCALE/ReAct) has no gradient defined here",
    "adascale_stats": "its top-k statistics have no gradient defined here",
}

_TENSOR = object()  # placeholder for a tensor argument in ctx.template


def _setup_context(ctx, inputs, output) -> None:
    ctx.template = [_TENSOR if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.save_for_backward(*(a for a in inputs if isinstance(a, torch.Tensor)))


def _reference_backward(op_name: str, fn):
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: the recompute below is not differentiable twice
            raise RuntimeError(f"actshift::{op_name}: double backward (create_graph=True) is not supported")
        saved = iter(ctx.saved_tensors)  # raises if an input was modified in place since the forward
        args, wrt = [], []
        for a, needs in zip(ctx.template, ctx.needs_input_grad):
            if a is _TENSOR:
                a = next(saved).detach()
                if needs:
                    a.requires_grad_(True)
                    wrt.append(a)
            args.append(a)
        with torch.enable_grad():
            outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
        if pairs and wrt:
            res = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                      allow_unused=True, materialize_grads=True)
        else:
            res = [torch.zeros_like(t) for t in wrt]
        it = iter(res)
        return tuple(next(it) if a is _TENSOR and needs else None
                     for a, needs in zip(ctx.template, ctx.needs_input_grad))

    return backward


def _no_backward(op_name: str, why: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"actshift::{op_name} is not differentiable: {why}. Detach its inputs "
                           "or run it under torch.no_grad()")

    return backward


def register(op_name: str) -> None:
    """Registers the backward of actshift::<op_name> ("sparse_linear", "steer_triton", ...)."""
    base = op_name.removesuffix("_triton")
    if base in _REFERENCE:
        backward = _reference_backward(op_name, _REFERENCE[base])
    else:
        backward = _no_backward(op_name, _NO_BACKWARD[base])
    torch.library.register_autograd(f"actshift::{op_name}", backward, setup_context=_setup_context)


_lib = torch.library.Library("actshift", "IMPL")  # holds the out ops' autograd kernels


def register_out(op_name: str) -> None:
    """torch's rules for the C++ out= op actshift::<op_name> (its last argument is `out`): like
    torch's own out= functions it refuses inputs that require grad in grad mode (the wrappers run
    the functional op then), refuses an `out` that torch would not update in place, and bumps
    out's version counter after the write."""
    op = getattr(torch.ops.actshift, op_name).default

    def autograd_kernel(keyset, *args):
        out = args[-1]
        check_inplace(out)
        if needs_grad(*args):
            raise RuntimeError(f"actshift::{op_name}: functions with out=... arguments don't support "
                               "automatic differentiation, but one of the arguments requires grad")
        with _BELOW_AUTOGRAD():
            result = op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        mark_written(out)
        return result

    _lib.impl(op_name, autograd_kernel, "Autograd", with_keyset=True)


def call(op, *args):
    """op(*args), through its autograd kernel only when grad mode is on and an input requires grad."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def needs_grad(*args) -> bool:
    """Whether a call on these arguments must build an autograd graph."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def check_inplace(out: torch.Tensor) -> None:
    """torch's rules for writing into `out` in place (what its own in-place ops enforce). Skipped while
    torch.compile traces: Dynamo cannot trace is_inference(), and the compiled graph writes `out`
    back with torch's own copy_, which applies them."""
    if torch.compiler.is_compiling():
        return
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("out: an inference tensor cannot be updated in place outside InferenceMode "
                           "(clone it first, or run under torch.inference_mode())")
    if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
        raise RuntimeError("out: a leaf tensor that requires grad cannot be written in place "
                           "(use out=None, or run under torch.no_grad())")


def mark_written(out: torch.Tensor) -> None:
    """Bumps out's version counter after a kernel wrote it, so a backward that saved it raises
    instead of silently using the new values (inference tensors have no counter: a no-op; under
    torch.compile the graph's own copy_ into `out` bumps it)."""
    if not torch.compiler.is_compiling():
        torch._C._increment_version((out,))
