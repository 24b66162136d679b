"""`CatsMLP`: CATS (threshold on |silu(gate)|) for a gated MLP, via the relu_ffn kernel's "cats" act."""
from __future__ import annotations

import torch
from torch import nn

from .linear import Counters, is_decode
from .thresholds import check_threshold


class CatsMLP(nn.Module):
    """down((silu(g) if |silu(g)| > t else 0) * up x) with g = gate x. Lossy by design (CATS).

    Decode runs the fused kernel, which reads only the up rows and down rows (of `w_down_t`) of
    neurons past the threshold. Other inputs run the original `mlp` (prefill="dense", exact) or
    the thresholded MLP in PyTorch (prefill="sparse", as CATS evaluates).
    """

    def __init__(self, mlp: nn.Module, threshold: float, *, prefill: str = "dense", backend: str = "auto"):
        super().__init__()
        if prefill not in ("dense", "sparse"):
            raise ValueError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
        self.threshold = check_threshold(threshold, "threshold")
        self.mlp = mlp
        self.register_buffer("w_down_t", mlp.down_proj.weight.detach().t().contiguous(), persistent=False)
        self.prefill = prefill
        self.backend = backend
        self.counters = Counters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import actshift

        m = self.mlp
        decode = is_decode(x)
        self.counters.tally(decode)
        if decode:
            if m.gate_proj.bias is None and m.up_proj.bias is None and m.down_proj.bias is None:
                return actshift.cats_mlp(x, m.gate_proj.weight, m.up_proj.weight, self.w_down_t, self.threshold,
                                         backend=self.backend)
            # cats_mlp is relu_ffn's "cats" act without biases; mlp_bias=True configs need them.
            return actshift.relu_ffn(x, m.gate_proj.weight, m.up_proj.weight, self.w_down_t, "cats", self.threshold,
                                     b_gate=m.gate_proj.bias, b_up=m.up_proj.bias, b_down=m.down_proj.bias,
                                     backend=self.backend)
        if self.prefill == "dense":
            return m(x)
        h = m.act_fn(m.gate_proj(x))
        return m.down_proj(h * (h.abs() > self.threshold) * m.up_proj(x))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}, prefill={self.prefill}"
