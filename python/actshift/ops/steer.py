"""The `steer` op: public wrapper, argument checks, backend dispatch, fake (meta) implementation.

Backends: "cpu" and "cuda" call torch.ops.actshift.steer (C++); "triton" calls
torch.ops.actshift.steer_triton (kernels/steer.py); "reference" is reference.steer.
Plans with more than add vectors (or calls asking for monitors or per-row weights) run the full
program: torch.ops.actshift.steer_program on "cpu" and "cuda", steer_program_triton on "triton",
reference.steer_program on "reference".
"""
from __future__ import annotations

import torch

from .. import _ext, backends, reference
from . import _autograd
from ..backends import BackendUnavailableError
from ..steering.plan import MAX_VECTORS, SteeringBank, as_bank
from ._fake import same_device

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SLOT_DTYPES = (torch.int32, torch.int64)

if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::steer")
    def _steer_fake(x, vectors, weights, strength, gate, slot):
        same_device("steer", x, vectors=vectors, weights=weights, strength=strength, gate=gate, slot=slot)
        torch._check(x.dim() == 2, lambda: "steer: x must be [rows, d]")
        return x.new_empty(x.shape)

    @torch.library.register_fake("actshift::steer_out")
    def _steer_out_fake(x, vectors, weights, strength, gate, slot, out):
        same_device("steer", x, vectors=vectors, weights=weights, strength=strength, gate=gate, slot=slot, out=out)
        return None

    @torch.library.register_fake("actshift::steer_program")
    def _steer_program_fake(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx,
                            neuron_val, condition, monitor, gate, slot, row_weights):
        same_device("steer_program", x, meta=meta, scalars=scalars, ablate=ablate, targets=targets,
                    affine=affine, vectors=vectors, weights=weights, neuron_idx=neuron_idx,
                    neuron_val=neuron_val, condition=condition, monitor=monitor, gate=gate, slot=slot,
                    row_weights=row_weights)
        torch._check(x.dim() == 2, lambda: "steer_program: x must be [rows, d]")
        return x.new_empty(x.shape), x.new_empty((x.shape[0], monitor.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("actshift::steer_program_out")
    def _steer_program_out_fake(x, meta, scalars, ablate, targets, affine, vectors, weights, neuron_idx,
                                neuron_val, condition, monitor, gate, slot, row_weights, out):
        same_device("steer_program_out", x, meta=meta, scalars=scalars, ablate=ablate, targets=targets,
                    affine=affine, vectors=vectors, weights=weights, neuron_idx=neuron_idx,
                    neuron_val=neuron_val, condition=condition, monitor=monitor, gate=gate, slot=slot,
                    row_weights=row_weights, out=out)
        return x.new_empty((x.shape[0], monitor.shape[1]), dtype=torch.float32)

    _autograd.register("steer")
    _autograd.register("steer_program")
    _autograd.register_out("steer_out")
    _autograd.register_out("steer_program_out")


def _triton_ready() -> bool:
    """Registers the Triton op once, where Triton can run (GPU, or the CPU interpreter)."""
    if backends.unavailable_reason("triton"):
        return False
    if not hasattr(torch.ops.actshift, "steer_triton"):
        from ..kernels import steer as triton_steer

        triton_steer.register()
        _autograd.register("steer_triton")
        _autograd.register("steer_program_triton")
    return True


if torch.cuda.is_available() or backends.triton_interpret():
    _triton_ready()


def _check_row_tensor(name: str, t, x: torch.Tensor, dtypes: tuple | None, what: str) -> None:
    if not isinstance(t, torch.Tensor) or (t.dtype not in dtypes if dtypes else not t.is_floating_point()):
        raise TypeError(f"{name} must be {what}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must hold one value per row ({x.shape[0]}), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_rows(x, gate, slot) -> None:
    """Per-call checks of x and the per-row tensors; messages name the argument."""
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"x must be [rows, d] with a contiguous last dim, got shape {tuple(x.shape)}")
    if gate is not None:
        _check_row_tensor("gate", gate, x, None, "a floating-point tensor")
    if slot is not None:
        _check_row_tensor("slot", slot, x, _SLOT_DTYPES, "an int32 or int64 tensor")


def _check_bank(x, vectors, weights, strength) -> None:
    """Checks of raw bank tensors (SteeringBank builds valid ones, so `steer` skips this)."""
    for name, t, dim in (("vectors", vectors, 3), ("weights", weights, 2), ("strength", strength, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
        if t.dim() != dim or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dim}-d tensor, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    S, m, d = vectors.shape
    if S < 1 or d != x.shape[-1]:
        raise ValueError(f"vectors must be [S >= 1, m, {x.shape[-1]}] for x's hidden size, got {tuple(vectors.shape)}")
    if m > MAX_VECTORS:
        raise ValueError(f"vectors holds {m} vectors per plan; at most {MAX_VECTORS} are supported")
    if tuple(weights.shape) != (S, m) or tuple(strength.shape) != (S,):
        raise ValueError(f"weights must be [{S}, {m}] and strength [{S}], got {tuple(weights.shape)}, {tuple(strength.shape)}")
    if not bool(torch.isfinite(vectors).all() & torch.isfinite(weights).all() & torch.isfinite(strength).all()):
        raise ValueError("vectors, weights and strength must be finite (found NaN or Inf)")


def _check_slot_values(slot: torch.Tensor, num_plans: int) -> None:
    """Rejects slots >= num_plans. Costs a device sync on GPU, so it is skipped while torch.compile
    traces or a CUDA graph captures (the kernels then leave such rows untouched)."""
    if slot.numel() == 0 or torch.compiler.is_compiling():
        return
    if slot.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    top = int(slot.max())
    if top >= num_plans:
        raise ValueError(f"slot holds {top}, out of range for {num_plans} plan(s); use -1 to leave a row untouched")


def _shares_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two [rows, d] tensors with a unit last stride share an element (the test of
    check_steer_out in csrc/steer_checks.cpp: exact for equal row strides, spans otherwise)."""
    rows, d = a.shape
    es = a.element_size()
    length = d * es
    delta = b.data_ptr() - a.data_ptr()
    if rows == 1 or a.stride(0) == b.stride(0):
        step = 0 if rows == 1 else a.stride(0) * es
        if step == 0:
            return abs(delta) < length
        k = min(max(-delta // step, -(rows - 1)), rows - 1)  # |delta + k·step| is convex in k
        return any(abs(delta + kk * step) < length for kk in (k - 1, k, k + 1) if -rows < kk < rows)
    a1 = a.data_ptr() + (rows - 1) * a.stride(0) * es + length
    b1 = b.data_ptr() + (rows - 1) * b.stride(0) * es + length
    return not (b1 <= a.data_ptr() or a1 <= b.data_ptr())


def _check_out(x: torch.Tensor, x2: torch.Tensor, out) -> torch.Tensor:
    """Validates `out` and returns its [rows, d] view (out=x steers in place). Like torch's in-place
    ops, a written-to tensor whose elements share memory is refused; so is one that shares memory
    with x without being x (the kernels write rows while other rows are still to be read)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}); "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if out.dim() == 2:
        out2 = out
    else:
        try:
            out2 = out.view(x2.shape)  # a view, so the kernel's writes land in out
        except RuntimeError:
            raise ValueError("out must be viewable as [rows, d] (contiguous leading dims)") from None
    rows, d = out2.shape
    if d > 1 and out2.stride(1) != 1:
        raise ValueError("out must have a contiguous last dim")
    if rows > 1 and d > 0 and out2.stride(0) < d:
        raise ValueError("out has internal overlap (more than one element of the written-to tensor "
                         "refers to a single memory location, e.g. an expanded tensor); clone() it first")
    if (out is not x and out2.numel() > 0 and not torch.compiler.is_compiling()
            and out2.untyped_storage().data_ptr() == x2.untyped_storage().data_ptr()
            and not (out2.data_ptr() == x2.data_ptr() and out2.stride() == x2.stride())
            and _shares_rows(x2, out2)):
        raise ValueError("out overlaps x; pass out=x for in-place steering or a separate tensor")
    return out2


def _as_rows(x, gate, slot, out):
    """x as [rows, d] (a view whenever the leading dims allow it), with gate/slot flattened to one
    value per row, all checked; returns (x2, gate as fp32 or None, slot, out as [rows, d] or None)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the hidden size)")
    # Explicit row count: reshape(-1, 0) cannot infer it for an empty hidden size.
    x2 = x if x.dim() == 2 else x.reshape(x.shape[:-1].numel(), x.shape[-1])
    # Per-row tensors keep their stride (an expanded one has stride 0): every kernel takes it.
    if isinstance(gate, torch.Tensor) and gate.dim() != 1:
        gate = gate.reshape(-1)
    if isinstance(slot, torch.Tensor) and slot.dim() != 1:
        slot = slot.reshape(-1)
    _check_rows(x2, gate, slot)
    out2 = None if out is None else _check_out(x, x2, out)
    if gate is not None and gate.dtype != torch.float32:
        gate = gate.float()
    return x2, gate, slot, out2


def _prepared(num_plans: int, check_slots: bool, functional, into, grad_args):
    """The per-call body shared by every backend and kind: run(x2, gate, slot, out2, inplace, *rest).

    functional(x2, gate, slot, *rest) returns the op's outputs, into(x2, gate, slot, out2, inplace,
    *rest) writes y into out2 and returns the other outputs (None where the backend has no out=
    kernel). In place, torch's rules apply: out2 must be writable in place, a call that needs a
    graph runs the functional op on a copy of x and records the write with copy_, and a kernel
    write bumps out2's version counter."""
    def run(x2, gate, slot, out2, inplace, *rest):
        if check_slots and slot is not None:
            _check_slot_values(slot, num_plans)
        if out2 is None:
            return functional(x2, gate, slot, *rest)
        _autograd.check_inplace(out2)
        grad = _autograd.needs_grad(x2, gate, out2, *rest, *grad_args)
        if grad or into is None:  # x itself must stay as autograd saved it
            outs = functional(x2.clone() if grad else x2, gate, slot, *rest)
            if isinstance(outs, tuple):
                return (out2.copy_(outs[0]), *outs[1:])
            return out2.copy_(outs)
        extra = into(x2, gate, slot, out2, inplace, *rest)
        _autograd.mark_written(out2)
        return out2 if extra is None else (out2, extra)

    return run


def _additive_runner(name: str, vectors, weights, strength, check_slots: bool = True):
    """The additive kernel of backend `name` bound to bank tensors: run(x2, gate, slot, out2, inplace)
    on checked [rows, d] arguments returns y (or out2). Built once per bank and device (see
    `runner`), so a decode step pays for one op call and little else."""
    bank = (vectors, weights, strength)
    check = check_slots and name != "cpu"  # the C++ CPU op checks slots before it writes
    if name == "reference":
        return _prepared(vectors.shape[0], check, lambda x2, gate, slot: reference.steer(x2, *bank, gate, slot),
                         None, bank)
    if name == "triton":
        _triton_ready()
        op, op_out = torch.ops.actshift.steer_triton.default, torch.ops.actshift.steer_triton_out.default

        def into(x2, gate, slot, out2, inplace):
            _autograd.call(op_out, x2, *bank, gate, slot, out2, inplace)
    else:
        op, op_out = torch.ops.actshift.steer.default, torch.ops.actshift.steer_out.default

        def into(x2, gate, slot, out2, inplace):
            _autograd.call(op_out, x2, *bank, gate, slot, out2)
    return _prepared(vectors.shape[0], check, lambda x2, gate, slot: _autograd.call(op, x2, *bank, gate, slot),
                     into, bank)


def _program_runner(name: str, prog):
    """Like `_additive_runner` for the full program: run(x2, gate, slot, out2, inplace, row_weights)
    returns (y or out2, monitors [rows, P])."""
    check = name != "cpu"
    if name == "reference":
        return _prepared(prog.meta.shape[0], check,
                         lambda x2, gate, slot, rw: reference.steer_program(x2, *prog, gate, slot, rw), None, prog)
    if name == "triton":
        op, op_out = torch.ops.actshift.steer_program_triton.default, torch.ops.actshift.steer_program_triton_out.default

        def into(x2, gate, slot, out2, inplace, rw):
            return _autograd.call(op_out, x2, *prog, gate, slot, rw, out2, inplace)
    else:
        op, op_out = torch.ops.actshift.steer_program.default, torch.ops.actshift.steer_program_out.default

        def into(x2, gate, slot, out2, inplace, rw):
            return _autograd.call(op_out, x2, *prog, gate, slot, rw, out2)
    return _prepared(prog.meta.shape[0], check,
                     lambda x2, gate, slot, rw: _autograd.call(op, x2, *prog, gate, slot, rw), into, prog)


def runner(bank: SteeringBank, device: torch.device, backend: str = "auto", kind: str = "add"):
    """The bank's kernel call on `device`, cached on the bank: kind "add" (additive plans, folded),
    "program" (the full program, folded add vectors) or "rows" (the program with per-row weights).
    Returns `run` as built by `_additive_runner` / `_program_runner`; its arguments must already be
    checked (as `steer` does, or the patch layer, which builds them itself)."""
    return _runner(bank, device, backends.resolve(backend, device), kind, backend)


def _runner(bank: SteeringBank, device: torch.device, name: str, kind: str, backend: str):
    key = ("run", kind, device, name)
    run = bank._cache.get(key)
    if run is None:
        if kind == "add":
            run = _additive_runner(name, *bank.tensors(device))
        else:
            run = _program_runner(_program_backend(name, device, backend), bank.program(device, folded=kind == "program"))
        bank._cache[key] = run
    return run


def apply_steer(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    check_slots: bool = True,
) -> torch.Tensor:
    """Additive steering on raw bank tensors; x may have any leading dims ([..., d]).

    vectors [S, m, d], weights [S, m], strength [S] (fp32, finite, on x's device); gate and slot
    have one entry per row of x.reshape(-1, d). `check_slots=False` skips the Python-side slot
    range check (a device sync on GPU); the GPU and reference backends then leave rows with an
    out-of-range slot untouched, while the cpu backend still raises (it checks for free). Prefer
    `steer` with a plan, which validates the bank once instead of on every call.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_bank(x, vectors, weights, strength)
    x2, gate, slot, out2 = _as_rows(x, gate, slot, out)
    run = _additive_runner(backends.resolve(backend, x2.device), vectors, weights, strength, check_slots)
    y = run(x2, gate, slot, out2, out is x)
    return out if out2 is not None else (y if x.dim() == 2 else y.view(x.shape))


def _fold_mask(gate, mask, x: torch.Tensor):
    """gate × mask (a token mask: bool or 0/1 per row) as one float gate."""
    if mask is None:
        return gate
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError("mask must be a bool or floating-point tensor with one entry per row")
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
    mask = mask.to(torch.float32)
    if gate is None:
        return mask
    if not isinstance(gate, torch.Tensor) or gate.shape != mask.shape:
        raise ValueError(f"gate must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(getattr(gate, 'shape', ()))}")
    return gate.float() * mask


def _program_backend(name: str, device: torch.device, requested: str) -> str:
    """The backend that runs the full program (a build without the CUDA kernels, or a Triton that
    cannot register, leaves "auto" with the reference and an explicit request with an error)."""
    if name == "cpu" or name == "reference":
        return name
    if name == "triton" and hasattr(torch.ops.actshift, "steer_program_triton"):
        return name
    if name == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("actshift::steer_program", "CUDA"):
        return name
    if requested == "auto" and backends.get_backend() == "auto":
        return "reference"  # "auto" takes the best available
    raise BackendUnavailableError(
        f"backend {name!r} cannot run the full steering program here (its kernel is not registered)"
    )


def _check_row_weights(weights, x2: torch.Tensor, M: int) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError("weights must be a floating-point tensor")
    if weights.device != x2.device:
        raise ValueError(f"weights is on {weights.device} but x is on {x2.device}")
    if M == 0:
        raise ValueError("weights were given but no plan in the bank has add vectors")
    rows = x2.shape[0]
    if weights.dim() == 1 and weights.shape[0] == M:
        weights = weights.expand(rows, M)
    elif weights.dim() >= 2 and weights.shape[-1] == M and weights.shape[:-1].numel() == rows:
        weights = weights.reshape(rows, M)
    else:
        raise ValueError(f"weights must be [{M}] or one row of {M} per row of x ([..., {M}]), got {tuple(weights.shape)}")
    # A device sync on GPU: skipped while torch.compile traces or a CUDA graph captures.
    capturing = weights.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contains NaN or Inf")
    weights = weights.float()
    # Any row stride (an expanded [M] has stride 0); the kernels need each row contiguous.
    return weights if M == 1 or weights.stride(1) == 1 else weights.contiguous()


def steer(
    x: torch.Tensor,
    plan,
    *,
    slot: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_monitors: bool = False,
    backend: str = "auto",
):
    """Applies a steering plan to hidden states x [..., d] in one pass over x.

    y = x + λ·g·(z − x), z = the plan's program (ablate, affine, add, neurons) on x, g = gate × mask ×
    the plan's condition; see `SteeringPlan`. Plans that only add vectors run the plain additive
    kernel: y = x + λ·g·Σ_j w_j v_j.

    Args:
        x: hidden states, fp32/fp16/bf16, last dim contiguous, any leading dims (0 rows allowed).
        plan: a SteeringPlan, or a SteeringBank / list of plans selected per row by `slot`.
        slot: int tensor with one plan index per row (x's leading shape); -1 leaves a row untouched
            (bit-exact, monitors 0).
        gate: float tensor with one multiplier per row (a score, or 0/1).
        mask: a token mask (bool or float per row), multiplied into the gate.
        weights: per-row add weights replacing the plans' static ones: [..., M] with one row per row
            of x (or [M] for every row), M = the bank's largest number of add vectors.
        out: where to write the result (x's shape, dtype and device); ``out=x`` steers in place,
            which avoids allocating (on CPU a fresh large output costs more than the op itself).
        return_monitors: also return the plans' read-outs x·Mᵀ of the input, fp32 [..., P]
            (P = the bank's largest monitor count; entries past a plan's own count are 0).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        A new tensor shaped like x, or `out`; with return_monitors, (that, monitors).
    """
    bank = as_bank(plan)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if (x.dim() == 2 and (out is None or out is x) and gate is None and slot is None and mask is None
            and weights is None and not return_monitors and bank.is_additive and len(bank) == 1):
        # The decode call: one plan on [rows, d], nothing per row. The C++ ops check x (dtype,
        # layout, hidden size) and out themselves, with messages that name them, so this path
        # skips the Python checks and costs little more than the op.
        device = x.device
        name = backends.resolve(backend, device)
        if name == "cpu" or name == "cuda":
            return _runner(bank, device, name, "add", backend)(x, None, None, out, out is x)
    if x.dim() >= 1 and x.shape[-1] != bank.hidden_size:
        raise ValueError(f"x has hidden size {x.shape[-1]} but the plan was built for {bank.hidden_size}")
    if slot is None and len(bank) > 1:
        raise ValueError(f"slot is required when the plan bank holds {len(bank)} plans")
    if mask is not None:
        gate = _fold_mask(gate, mask, x)
    x2, gate, slot, out2 = _as_rows(x, gate, slot, out)
    if bank.is_additive and weights is None and not return_monitors:
        y = runner(bank, x2.device, backend, "add")(x2, gate, slot, out2, out is x)
        return out if out2 is not None else (y if x.dim() == 2 else y.view(x.shape))
    row_weights = None if weights is None else _check_row_weights(weights, x2, bank.max_vectors)
    run = runner(bank, x2.device, backend, "program" if row_weights is None else "rows")
    y, monitors = run(x2, gate, slot, out2, out is x, row_weights)
    y = out if out2 is not None else (y if x.dim() == 2 else y.view(x.shape))
    monitors = monitors.view(*x.shape[:-1], monitors.shape[-1])
    return (y, monitors) if return_monitors else y
