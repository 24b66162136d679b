"""The `relu_ffn` op (and `cats_mlp`, its CATS form): public wrapper, argument checks, backend
dispatch, fake impl.

Backends: "cpu" and "cuda" call torch.ops.actshift.relu_ffn (C++); "triton" calls
torch.ops.actshift.relu_ffn_triton (kernels/relu_ffn.py); "reference" is reference.relu_ffn.
"""
from __future__ import annotations

import torch

from .. import _ext, backends, reference
from ..reference import GATED_ONLY_ACTS, SPARSE_ACTS, THRESHOLD_ACTS
from . import _autograd
from ._fake import same_device
from ._sparse import as_rows, check_like, register_triton_early, threshold_value, triton_op

ACTS = SPARSE_ACTS
_CODES = {name: i for i, name in enumerate(SPARSE_ACTS)}

if _ext.EXT_LOADED:

    @torch.library.register_fake("actshift::relu_ffn")
    def _relu_ffn_fake(x, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up, b_down):
        same_device("relu_ffn", x, w_gate=w_gate, w_up=w_up, w_down_t=w_down_t, b_gate=b_gate, b_up=b_up,
                    b_down=b_down)
        torch._check(x.dim() == 2, lambda: "relu_ffn: x must be [rows, d]")
        return x.new_empty(x.shape)

    _autograd.register("relu_ffn")


register_triton_early("relu_ffn")


def _check_weights(x2, w_gate, w_up, w_down_t, b_gate, b_up, b_down) -> None:
    d = x2.shape[1]
    if not isinstance(w_gate, torch.Tensor) or w_gate.dim() != 2:
        raise ValueError(f"w_gate must be a 2-d [ffn, d] tensor, got {getattr(w_gate, 'shape', type(w_gate).__name__)}")
    ffn = w_gate.shape[0]
    check_like(w_gate, "w_gate", x2, (ffn, d), f" ([ffn, d] with d = x's last dim {d})")
    if w_up is not None:
        check_like(w_up, "w_up", x2, (ffn, d), " (like w_gate)")
    check_like(w_down_t, "w_down_t", x2, (ffn, d), " (down_proj.weight.t().contiguous(), [ffn, d])")
    if b_gate is not None:
        check_like(b_gate, "b_gate", x2, (ffn,))
    if b_up is not None:
        if w_up is None:
            raise ValueError("b_up needs w_up (a non-gated FFN has no up projection)")
        check_like(b_up, "b_up", x2, (ffn,))
    if b_down is not None:
        check_like(b_down, "b_down", x2, (d,))


def relu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    act: str = "relu",
    threshold: float = 0.0,
    *,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A ReLU-family FFN that never reads the up and down weights of inactive neurons; exact
    (equal to the dense FFN within the dtype's tolerance) at any sparsity.

    Gated (w_up given): y = W_down (gate_act(W_gate x + b_gate) * up_act(W_up x + b_up)) + b_down.
    Non-gated (w_up None): y = W_2 gate_act(W_1 x + b_gate) + b_down, with W_1 = w_gate.
    A neuron is active iff its gate activation is nonzero (in any row of the batch).

    Args:
        x: [..., d] fp32/fp16/bf16, any leading dims.
        w_gate, w_up: [ffn, d] (nn.Linear weights) of x's dtype; w_up None for a non-gated FFN.
        w_down_t: [ffn, d], `down_proj.weight.t().contiguous()`: a neuron's down weights are a row.
        act: "relu" relu(g)·u; "fatrelu" (g if g > threshold else 0)·u (ProSparse); "relu2"
            relu(g)²·u; "drelu" relu(g)·relu(u) (TurboSparse, gated only); "cats" (silu(g) if
            |silu(g)| > threshold else 0)·u (CATS, gated only, lossy by design).
        threshold: finite, >= 0; used by fatrelu and cats (must be 0 for the others).
        b_gate, b_up: [ffn]; b_down: [d]; x's dtype, or None.
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        y [..., d] in x's dtype (the intermediate h stays fp32).
    """
    if act not in _CODES:
        raise ValueError(f"act must be one of {', '.join(ACTS)}, got {act!r}")
    x2 = as_rows(x)
    if act in GATED_ONLY_ACTS and w_up is None:
        raise ValueError(f"act {act!r} needs w_up (it is defined for gated FFNs only)")
    t = threshold_value(threshold)
    if t != 0 and act not in THRESHOLD_ACTS:
        raise ValueError(f"threshold is used by {' and '.join(THRESHOLD_ACTS)} only; got {t} with act {act!r}")
    _check_weights(x2, w_gate, w_up, w_down_t, b_gate, b_up, b_down)
    name = backends.resolve(backend, x2.device)
    if name == "reference":
        y = reference.relu_ffn(x2, w_gate, w_up, w_down_t, act, t, b_gate, b_up, b_down)
    else:
        op = triton_op("relu_ffn") if name == "triton" else torch.ops.actshift.relu_ffn
        y = _autograd.call(op, x2, w_gate, w_up, w_down_t, _CODES[act], t, b_gate, b_up, b_down)
    return y.view(x.shape)


def cats_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """CATS (Lee et al. 2024): a SwiGLU MLP with |silu(gate)| <= threshold zeroed, skipping those
    neurons' up and down weights. `relu_ffn(..., act="cats")`; lossy by design (the threshold is
    usually calibrated to a target sparsity, e.g. the 50th percentile of |silu(gate)|)."""
    return relu_ffn(x, w_gate, w_up, w_down_t, "cats", threshold, backend=backend)
