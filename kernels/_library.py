"""How every Triton kernel module defines its torch custom ops (its `register()`)."""
from __future__ import annotations

import functools

import torch
import triton


def define_op(name: str, fn, fake, *, kernel, mutates_args=(), schema: str | None = None):
    """Defines the custom op `name` running `fn`.

    Where `kernel` is a compiled @triton.jit function (a GPU), a torch.library.triton_op, so that
    torch.compile sees the kernel launches. Under TRITON_INTERPRET=1, @triton.jit yields an
    interpreted function that wrap_triton passes through untraced, so tracing would run the kernel
    on data-less FakeTensors; there the op is an opaque custom_op with the shape-only `fake`, which
    keeps opcheck and torch.compile usable on CPU.
    """
    fn = _on_device_of_first_arg(fn)
    if isinstance(kernel, triton.runtime.JITFunction):
        return torch.library.triton_op(name, fn, mutates_args=mutates_args, schema=schema)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake)
    return op


def _on_device_of_first_arg(fn):
    """`fn` run with its first argument's GPU current, as the C++ bindings' CUDAGuard: Triton
    launches on the current device and its stream, so a tensor on cuda:1 while cuda:0 is current
    would otherwise fault or race. Every op's first argument is its main input (x or z)."""

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        t = args[0]
        if t.is_cuda:
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return launch
