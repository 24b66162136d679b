"""Pure-PyTorch reference implementations: the executable truth of every op contract.

Each function computes in fp32 (fp64 for fp64 inputs, so gradcheck can use them as the
oracle of the ops' backward) and returns the input's dtype. They are the `reference` backend and
the oracle of the tests; kernels must match them within the tolerance table of the README.
"""
from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> torch.dtype:
    """The compute dtype for input x: fp32, or fp64 when x is fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def steer(
    x: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    strength: torch.Tensor,
    gate: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive steering of rows: y = x + λ_s · g · Σ_j w_{s,j} v_{s,j}.

    x [rows, d]; vectors [S, m, d], weights [S, m], strength [S] (fp32) form a bank of S plans;
    gate [rows] (fp32, default 1); slot [rows] picks each row's plan (default 0; -1, and like the
    kernels any value outside [0, S), leaves the row untouched).
    """
    rows = x.shape[0]
    s = torch.zeros(rows, dtype=torch.long, device=x.device) if slot is None else slot.long()
    keep = (s < 0) | (s >= vectors.shape[0])
    s = torch.where(keep, 0, s)
    ct = _wide(x)
    g = torch.ones(rows, device=x.device, dtype=ct) if gate is None else gate.to(ct)
    coef = (strength[s] * g)[:, None] * weights[s]  # [rows, m]
    delta = torch.einsum("rm,rmd->rd", coef, vectors[s])
    y = (x.to(ct) + delta).to(x.dtype)
    return torch.where(keep[:, None], x, y)


# Flag bits of the steering program (csrc/include/actshift/steer.h).
STEER_AFFINE, STEER_CONDITION, STEER_COSINE, STEER_LESS, STEER_RENORM = 1, 2, 4, 8, 16


def steer_program(
    x: torch.Tensor,
    meta: torch.Tensor,
    scalars: torch.Tensor,
    ablate: torch.Tensor,
    targets: torch.Tensor,
    affine: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    neuron_idx: torch.Tensor,
    neuron_val: torch.Tensor,
    condition: torch.Tensor,
    monitor: torch.Tensor,
    gate: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full steering program of each row (contract: csrc/include/actshift/steer.h); -> (y, monitors).

    A bank of S plans, zero-padded: meta [S, 5] int32 {flags, k, m, n, p}; scalars [S, 2] {λ, threshold};
    ablate [S, K, d] (orthonormal rows) and targets [S, K]; affine [S, 2, d] {scale, bias} or [S, 0, d];
    vectors [S, M, d] and weights [S, M]; neuron_idx [S, N] int32 and neuron_val [S, 2, N] {mul, add};
    condition [S, 1, d] (unit-norm for cosine) or [S, 0, d]; monitor [S, P, d]. Per row: gate [rows],
    slot [rows] (-1 or >= S: untouched, monitors 0), row_weights [rows, M] (replaces weights[slot]).
    Every dot product reads the input row x; y = x + λ·g·(z − x) with z the program applied to x.
    """
    rows, d = x.shape
    S, dev, ct = meta.shape[0], x.device, _wide(x)
    xf = x.to(ct)
    s = torch.zeros(rows, dtype=torch.long, device=dev) if slot is None else slot.long()
    keep = (s < 0) | (s >= S)
    s = torch.where(keep, 0, s)
    meta_r = meta.long()[s]
    flags = meta_r[:, 0]

    def first(count: torch.Tensor, size: int) -> torch.Tensor:  # [rows, size]: entry < the row's count
        return torch.arange(size, device=dev)[None] < count[:, None]

    def has(bit: int) -> torch.Tensor:
        return (flags & bit) != 0

    # Read-outs on the input row. Padding is masked with where, not a product: a NaN in x must
    # not reach a plan through the zero rows other plans of the bank pad it with (NaN · 0 is NaN).
    mon = torch.where(first(meta_r[:, 4], monitor.shape[1]), torch.einsum("rd,rpd->rp", xf, monitor[s]), 0.0)
    norm = xf.pow(2).sum(1).sqrt()
    U = ablate[s]
    ablate_coef = torch.where(first(meta_r[:, 1], ablate.shape[1]), torch.einsum("rd,rkd->rk", xf, U) - targets[s], 0.0)
    cond = torch.ones(rows, device=dev, dtype=ct)
    if condition.shape[1] == 1:
        dot = (xf * condition[s, 0]).sum(1)
        score = torch.where(has(STEER_COSINE), torch.where(norm > 0, dot / norm, 0.0), dot)
        thr = scalars[s, 1]
        holds = torch.where(has(STEER_LESS), score < thr, score > thr)
        cond = torch.where(has(STEER_CONDITION), holds.to(ct), 1.0)
    # The program.
    z = xf - torch.einsum("rk,rkd->rd", ablate_coef, U)
    if affine.shape[1] == 2:
        z = torch.where(has(STEER_AFFINE)[:, None], affine[s, 0] * z + affine[s, 1], z)
    w = weights[s] if row_weights is None else row_weights.to(ct)
    z = z + torch.einsum("rm,rmd->rd", w * first(meta_r[:, 2], vectors.shape[1]), vectors[s])
    if neuron_idx.shape[1] > 0:
        idx = neuron_idx.long()[s]
        picked = z.gather(1, idx)
        edited = neuron_val[s, 0] * picked + neuron_val[s, 1]
        # Indices are unique within a plan and padding contributes 0, so adding the change is exact.
        z = z.scatter_add(1, idx, torch.where(first(meta_r[:, 3], neuron_idx.shape[1]), edited - picked, 0.0))
    g = cond if gate is None else gate.to(ct) * cond
    c = scalars[s, 0] * g
    y = xf + c[:, None] * (z - xf)
    y_norm = y.pow(2).sum(1).sqrt()
    factor = torch.where(has(STEER_RENORM) & (y_norm > 0), norm / y_norm, 1.0)
    y = (y * factor[:, None]).to(x.dtype)
    untouched = keep | (c == 0)
    return torch.where(untouched[:, None], x, y), torch.where(keep[:, None], 0.0, mon)


# --- percentile scaling (ASH, SCALE, ReAct, AdaSCALE) ------------------------------------------

PERCENTILE_METHODS = ("ratio", "scale", "ash_p", "ash_b", "ash_s", "react")


def topk_mask(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[N, D] bool: the k[n] largest entries of each row, ties kept in index order.

    A stable descending sort lists equal values by ascending index, so its first k positions are
    exactly the kernels' rule: everything above the k-th value, then the first equal ones."""
    idx = torch.sort(z, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(idx).scatter_(1, idx, torch.arange(z.shape[1], device=z.device).expand_as(idx))
    return rank < k.to(z.device).long()[:, None]


def percentile_scale(
    z: torch.Tensor, k: torch.Tensor, method: str, clip: float | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Percentile scaling of each row of z [N, D] keeping k[n] elements; returns (y, r).

    r = s1 / s2 (fp32): the row sum over the sum of its k largest values. y per method:
    scale z·e^r; ash_p keeps the top-k, zeroes the rest; ash_b writes s1/k at the kept positions;
    ash_s = ash_p·e^r; react min(z, clip); ratio returns no y. `clip` is applied first for every
    method. A row holding NaN/Inf (after the clip) gives NaN in y and r. react returns r = None.
    """
    zf = z.float()
    if clip is not None:
        zf = zf.clamp(max=clip)
    if method == "react":
        return zf.to(z.dtype), None
    finite = torch.isfinite(zf).all(dim=1)
    safe = torch.where(finite[:, None], zf, 0.0)
    kept = topk_mask(safe, k)
    s1 = safe.sum(dim=1)
    s2 = (safe * kept).sum(dim=1)
    r = torch.where(finite, s1 / s2, torch.nan)
    if method == "ratio":
        return None, r
    scale = torch.exp(r)[:, None]
    if method == "scale":
        y = safe * scale
    elif method == "ash_p":
        y = safe * kept
    elif method == "ash_b":
        y = torch.where(kept, (s1 / k.to(z.device).float())[:, None], 0.0)
    elif method == "ash_s":
        y = safe * kept * scale
    else:
        raise ValueError(f"method must be one of {PERCENTILE_METHODS}, got {method!r}")
    y = torch.where(finite[:, None], y, torch.nan)
    return y.to(z.dtype), r


def adascale_stats(z: torch.Tensor, z_perturbed: torch.Tensor, k1: int, k2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaSCALE's per-row statistics (fp32): Q = Σ |z − z̃| over the top-k1 positions of z and
    C_o = Σ relu(z̃) over the top-k2 positions of z (ties in index order, as in topk_mask)."""
    zf, pf = z.float(), z_perturbed.float()
    n = z.shape[0]
    m1 = topk_mask(zf, torch.full((n,), k1))
    m2 = topk_mask(zf, torch.full((n,), k2))
    # where, not a product with the mask: a NaN outside the top-k must not reach the sums (NaN·0).
    q = torch.where(m1, (zf - pf).abs(), 0.0).sum(dim=1)
    c_o = torch.where(m2, pf.clamp(min=0), 0.0).sum(dim=1)
    return q, c_o


# --- sparse-activation gating and ReLU-sparse FFN (sparse_threshold, sparse_linear, relu_ffn) ----

SPARSE_ACTS = ("relu", "fatrelu", "relu2", "drelu", "cats")  # index = the C++ act code
GATED_ONLY_ACTS = ("drelu", "cats")
THRESHOLD_ACTS = ("fatrelu", "cats")


def _as_threshold(threshold, x: torch.Tensor) -> torch.Tensor:
    """The threshold as fp32 on x's device: a number, a [1] or a per-channel [n] tensor."""
    return torch.as_tensor(threshold, dtype=torch.float32, device=x.device)


def sparse_threshold(x: torch.Tensor, threshold) -> torch.Tensor:
    """y = x where |x| > t else 0 (strictly greater; NaN stays NaN), in x's dtype.

    x [..., n]; threshold a number or an fp32 tensor [1] or [n] (per channel), compared in fp32.
    """
    xf = x.to(_wide(x))
    return torch.where(xf.abs() <= _as_threshold(threshold, x), 0.0, xf).to(x.dtype)


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, threshold, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = sparse_threshold(x, t) @ weight_t + bias in fp32, returned in x's dtype.

    x [..., in]; weight_t [in, out] (= linear.weight.t()); bias [out] or None.
    """
    ct = _wide(x)
    xt = sparse_threshold(x.to(ct), threshold)
    y = xt @ weight_t.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def ffn_activation(act: str, g: torch.Tensor, u: torch.Tensor | None, threshold: float = 0.0) -> torch.Tensor:
    """h of relu_ffn from fp32 gate pre-activations g and (gated) up projections u.

    gate_act: relu max(g, 0); fatrelu g if g > T else 0; relu2 relu(g)^2; drelu relu(g);
    cats silu(g) if |silu(g)| > T else 0. Gated: h = gate_act(g) * u, with relu(u) for drelu.
    NaN gates stay NaN (they count as active neurons).
    """
    if act == "fatrelu":
        a = torch.where(g <= threshold, 0.0, g)
    elif act == "cats":
        s = torch.nn.functional.silu(g)
        a = torch.where(s.abs() <= threshold, 0.0, s)
    else:
        a = torch.where(g <= 0, 0.0, g)
        if act == "relu2":
            a = a * a
    if u is None:
        return a
    return a * (torch.where(u <= 0, 0.0, u) if act == "drelu" else u)


def relu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    act: str = "relu",
    threshold: float = 0.0,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense FFN in fp32: y = W_down h + b_down with h = ffn_activation(act, W_gate x + b_gate,
    W_up x + b_up, threshold) (gated), or h = gate_act(W_1 x + b_gate) when w_up is None.

    x [..., d]; w_gate, w_up [ffn, d] (nn.Linear weights); w_down_t [ffn, d] (= down.weight.t());
    biases [ffn] (gate, up) and [d] (down). Output in x's dtype; h stays fp32.
    """
    ct = _wide(x)
    xf = x.to(ct)
    g = torch.nn.functional.linear(xf, w_gate.to(ct), None if b_gate is None else b_gate.to(ct))
    u = None
    if w_up is not None:
        u = torch.nn.functional.linear(xf, w_up.to(ct), None if b_up is None else b_up.to(ct))
    y = ffn_activation(act, g, u, threshold) @ w_down_t.to(ct)
    if b_down is not None:
        y = y + b_down.to(ct)
    return y.to(x.dtype)


# Routing kinds of `route` (csrc/include/actshift/route.h): softmax then top-k (Mixtral, Qwen-MoE,
# OLMoE), and sigmoid with a correction bias and group-limited top-k (DeepSeek-V3).
ROUTE_SOFTMAX, ROUTE_SIGMOID = 0, 1
# Per-plan expert modes (`modes` [S, E] int8).
EXPERT_FREE, EXPERT_OFF, EXPERT_ON = 0, 1, 2


def route(
    logits: torch.Tensor,
    k: int,
    offsets: torch.Tensor | None = None,
    modes: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    kind: int = ROUTE_SOFTMAX,
    renorm: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing with per-row expert edits; returns (indices [rows, k] int64, weights [rows, k] fp32).

    logits [rows, E] (any float dtype, computed in fp32). A bank of S plans: offsets [S, E] fp32
    (already multiplied by each plan's strength), modes [S, E] int8 (0 free, 1 off, 2 forced on);
    slot [rows] picks each row's plan (default 0; -1 or any value outside [0, S) leaves the row
    unedited). Per row, with z = logits + offsets[slot]:

    softmax (kind 0): p = softmax(z) over the experts not switched off (off experts get p = 0 and
    stay out of the normaliser). Selection key = z.
    sigmoid (kind 1): s = sigmoid(z), key c = s + bias. Experts are split into n_group equal groups;
    a group's score is the sum of its two largest c over experts not switched off (an off expert
    counts as -inf, so a group with fewer than two live experts scores -inf); the topk_group best
    groups (ties: lowest group) make their live experts eligible.

    Selection: k experts in order of (tier, key, -index), descending: tier 2 forced on, tier 1
    eligible (every live expert for softmax), tier 0 live but outside the chosen groups (sigmoid
    only; reached only when the chosen groups hold fewer than k live experts), off experts never.
    So forced experts always come first and take the places of the lowest-scoring ones, equal keys
    pick the lowest index, and the plan checks (forced <= k, live >= k) guarantee k picks.

    Weights: softmax p (or sigmoid s, without the bias) of the picked experts; with renorm divided
    by their sum (sigmoid: sum + 1e-20, as DeepSeek-V3); then times `scale`.
    """
    rows, E = logits.shape
    dev = logits.device
    z = logits.float()
    if offsets is not None and offsets.shape[0] > 0 and rows > 0:
        s = torch.zeros(rows, dtype=torch.long, device=dev) if slot is None else slot.long()
        keep = (s < 0) | (s >= offsets.shape[0])
        s = torch.where(keep, 0, s)
        z = torch.where(keep[:, None], z, z + offsets[s])
        mode = torch.where(keep[:, None], 0, modes[s].long())
    else:
        mode = torch.zeros(rows, E, dtype=torch.long, device=dev)
    off, on = mode == EXPERT_OFF, mode == EXPERT_ON
    neg = torch.tensor(float("-inf"), device=dev)
    if kind == ROUTE_SOFTMAX:
        score = torch.softmax(torch.where(off, neg, z), dim=-1)
        key = z
        tier = torch.where(on, 2, torch.where(off, -1, 1))
    else:
        score = torch.sigmoid(z)
        key = score + (bias.float() if bias is not None else 0.0)
        live = torch.where(off, neg, key).view(rows, n_group, E // n_group)
        group_score = live.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [rows, n_group]
        chosen = _top_lowest_index(group_score, topk_group)
        in_group = torch.zeros(rows, n_group, dtype=torch.bool, device=dev).scatter_(1, chosen, True)
        in_group = in_group[:, :, None].expand(rows, n_group, E // n_group).reshape(rows, E)
        tier = torch.where(on, 2, torch.where(off, -1, torch.where(in_group, 1, 0)))
    # Lexicographic (tier, key, -index): rank by key among equal tiers via a stable sort.
    order = torch.argsort(key, dim=-1, descending=True, stable=True)  # equal keys: lowest index first
    order = order.gather(1, torch.argsort(tier.gather(1, order), dim=-1, descending=True, stable=True))
    idx = order[:, :k]
    w = score.gather(1, idx)
    if renorm:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if kind == ROUTE_SIGMOID else 0.0))
    return idx, w * scale


def _top_lowest_index(x: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest entries per row, equal values by lowest index."""
    return torch.argsort(x, dim=-1, descending=True, stable=True)[:, :n]
