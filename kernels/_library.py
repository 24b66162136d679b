"""How every Triton kernel module defines its torch custom ops (its `register()`)."""
from __future__ import annotations

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
    if isinstance(kernel, triton.runtime.JITFunction):
        return torch.library.triton_op(name, fn, mutates_args=mutates_args, schema=schema)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake)
    return op
