"""FFN modules running actshift.relu_ffn at decode: exact ReLU-family skipping (issue 6)."""
from __future__ import annotations

import torch
from torch import nn

from .linear import Counters, is_decode
from .sites import linear_weight_t
from .thresholds import check_threshold

ACTS = ("relu", "fatrelu", "relu2")


def _check_act(act: str, threshold: float) -> float:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return check_threshold(threshold, "threshold")


class ReluGatedMLP(nn.Module):
    """Replaces a Llama/Mistral/Qwen-style MLP down(act(gate x) * up x) with a ReLU-family act.

    At decode, actshift.relu_ffn reads only the up rows and the down rows (of `w_down_t`, the
    transposed down weight made at patch time) of neurons whose gate activation is nonzero; the
    result equals the dense MLP within fp32 rounding. Other inputs run the original `mlp`.
    """

    def __init__(self, mlp: nn.Module, act: str, threshold: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        self.threshold = _check_act(act, threshold)
        self.act = act
        self.mlp = mlp
        self.register_buffer("w_down_t", mlp.down_proj.weight.detach().t().contiguous(), persistent=False)
        self.backend = backend
        self.counters = Counters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import actshift

        decode = is_decode(x)
        self.counters.tally(decode)
        if not decode:
            return self.mlp(x)
        m = self.mlp
        return actshift.relu_ffn(x, m.gate_proj.weight, m.up_proj.weight, self.w_down_t, self.act, self.threshold,
                                 b_gate=m.gate_proj.bias, b_up=m.up_proj.bias, b_down=m.down_proj.bias,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return f"act={self.act}, threshold={self.threshold:.4g}"


class ReluFFN(nn.Module):
    """Replaces the first linear of a non-gated FFN fc2(act(fc1 x)) (OPT fc1/fc2, GPT-2 c_fc/c_proj,
    BERT intermediate/output dense) by the whole FFN; the patch turns the activation and fc2 into
    nn.Identity so the block's code (dropout, residual, LayerNorm) is unchanged. Decode runs
    actshift.relu_ffn (non-gated): only the down rows of active neurons are read."""

    def __init__(self, fc1: nn.Module, act_fn: nn.Module, fc2: nn.Module, act: str, threshold: float = 0.0, *,
                 backend: str = "auto"):
        super().__init__()
        self.threshold = _check_act(act, threshold)
        self.act = act
        self.fc1, self.act_fn, self.fc2 = fc1, act_fn, fc2
        w1_t, d, ffn = linear_weight_t(fc1)
        w2_t, ffn2, d2 = linear_weight_t(fc2)
        if (ffn2, d2) != (ffn, d):
            raise ValueError(f"model: FFN linears do not chain ({d}->{ffn} then {ffn2}->{d2})")
        # relu_ffn wants W1 as [ffn, d] (nn.Linear's layout) and W2 transposed as [ffn, d].
        self.register_buffer("w1", w1_t.detach().t().contiguous(), persistent=False)
        self.register_buffer("w_down_t", w2_t.detach().contiguous(), persistent=False)
        self.backend = backend
        self.counters = Counters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import actshift

        decode = is_decode(x)
        self.counters.tally(decode)
        if not decode:
            return self.fc2(self.act_fn(self.fc1(x)))
        return actshift.relu_ffn(x, self.w1, None, self.w_down_t, self.act, self.threshold,
                                 b_gate=self.fc1.bias, b_down=self.fc2.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"act={self.act}, threshold={self.threshold:.4g}"
