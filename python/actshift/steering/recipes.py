"""Steering recipes: published ways to make steering vectors and edits, as plans for `actshift.steer`
and sites for `actshift.patch`. No new kernels: each recipe computes tensors from activations and
hands them to the one fused op.

Math helpers take activations ([n, d] tensors, e.g. from `extract_activations`); the model-level
helpers extract them first. Vectors are fp32 on CPU, keyed by 0-based decoder layer.
The patch layer is imported inside functions: it imports the op, which imports this package.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .extract import check_layers, decoder_layers, extract_activations, hidden_size
from .plan import SteeringPlan

# --- checks -----------------------------------------------------------------------------------------


def _paired(positive, negative, name: str = "positive/negative") -> tuple[torch.Tensor, torch.Tensor]:
    for arg, t in (("positive", positive), ("negative", negative)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{arg} must be a floating-point tensor [n, d]")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{arg} must be [n >= 1, d >= 1], got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{arg} contains NaN or Inf")
    if positive.shape != negative.shape:
        raise ValueError(f"{name}: positive {tuple(positive.shape)} and negative {tuple(negative.shape)} must match (one row per pair)")
    return positive.double(), negative.double()


def _check_pairs(pairs) -> tuple[list[str], list[str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError("pairs must be a sequence of (positive, negative) string pairs")
    if not pairs:
        raise ValueError("pairs is empty; give at least one (positive, negative) pair")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
            raise ValueError(f"pairs[{i}] must be a (positive, negative) pair of strings")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _check_vector(v, d: int | None, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
        raise TypeError(f"{name} must be a floating-point tensor [d]")
    if d is not None and v.shape[0] != d:
        raise ValueError(f"{name} has hidden size {v.shape[0]}, expected {d}")
    if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        raise ValueError(f"{name} must be finite and non-zero")
    return v.detach().float().cpu()


def _contrastive(model, pairs, layers, tokenizer, pooling, batch_size, progress):
    positives, negatives = _check_pairs(pairs)
    kwargs = dict(tokenizer=tokenizer, pooling=pooling, batch_size=batch_size, progress=progress)
    pos = extract_activations(model, positives, layers, **kwargs)
    neg = extract_activations(model, negatives, layers, **kwargs)
    return pos, neg


# --- CAA and PCA control vectors --------------------------------------------------------------------


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """CAA (Rimsky et al.): mean(positive) − mean(negative) over contrastive pairs, [d] fp32."""
    p, n = _paired(positive, negative)
    return (p.mean(0) - n.mean(0)).float()


def pca_direction(positive: torch.Tensor, negative: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """repeng-style control direction: the first principal component of the paired differences.

    Args:
        positive, negative: [n, d] activations, row i of each from the same pair.
        center: subtract the mean difference before the PCA, as repeng's `pca_diff` does (through
            sklearn's PCA); False takes the top singular vector of the raw differences instead,
            which follows the mean difference when the pairs agree.

    Returns:
        A unit vector [d] (fp32), signed so that positives project higher than their negatives in
        at least half of the pairs (repeng's rule).
    """
    p, n = _paired(positive, negative)
    diff = p - n
    if center:
        diff = diff - diff.mean(0)
    _, _, vh = torch.linalg.svd(diff, full_matrices=False)
    u = vh[0]
    if float(u.norm()) == 0.0 or not bool(torch.isfinite(u).all()):
        raise ValueError("positive/negative: the paired differences have no principal direction (all equal)")
    higher = ((p @ u) > (n @ u)).double().mean()
    return (u if higher >= 0.5 else -u).float()


NORMALIZE = ("raw", "unit", "mean_norm")


def normalize_vector(v: torch.Tensor, normalize: str, mean_norm: float | None = None) -> torch.Tensor:
    """v as is ("raw"), scaled to norm 1 ("unit"), or to `mean_norm`, the mean norm of the layer's
    activations ("mean_norm": then strength 1 adds a vector as long as a typical hidden state)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(map(repr, NORMALIZE))}, got {normalize!r}")
    if normalize == "raw":
        return v
    norm = float(v.norm())
    if norm == 0.0:
        raise ValueError("normalize: the vector is zero and has no direction to scale")
    if normalize == "mean_norm" and mean_norm is None:
        raise ValueError("normalize='mean_norm' needs the mean activation norm of the layer")
    return v * ((1.0 if normalize == "unit" else mean_norm) / norm)


def _normalized(vectors: dict, pos: dict, neg: dict, normalize: str) -> dict[int, torch.Tensor]:
    """Applies `normalize` per layer; mean_norm is the mean ‖h‖ over the pairs' activations."""
    return {layer: normalize_vector(v, normalize, float(torch.cat([pos[layer], neg[layer]]).norm(dim=1).mean()))
            for layer, v in vectors.items()}


def caa_vectors(model, pairs, layers, *, tokenizer=None, pooling="last", normalize: str = "raw",
                batch_size: int = 8, progress: bool | None = None) -> dict[int, torch.Tensor]:
    """CAA steering vectors per layer from (positive, negative) prompt pairs: {layer: [d]}.

    Activations are read at the last token by default (CAA reads the answer letter at the end of
    each prompt); `pooling` takes "mean" or any read position of `extract_activations` (e.g. -2,
    the token before the last). Add them with `SteeringPlan(add=v, strength=s)` at the layer's
    block output.

    normalize: "raw" (default, the mean difference as is: its norm depends on the model and the
    layer, so a strength is not comparable across recipes), "unit" (norm 1, like `pca_vectors`)
    or "mean_norm" (norm = the mean activation norm of the pairs at that layer, so strength s adds
    s typical hidden-state lengths: comparable across layers and models).
    """
    pos, neg = _contrastive(model, pairs, layers, tokenizer, pooling, batch_size, progress)
    return _normalized({layer: mean_difference(pos[layer], neg[layer]) for layer in pos}, pos, neg, normalize)


def pca_vectors(model, pairs, layers, *, tokenizer=None, center: bool = True, pooling="last",
                normalize: str = "unit", batch_size: int = 8, progress: bool | None = None) -> dict[int, torch.Tensor]:
    """repeng control vectors per layer from (positive, negative) prompt pairs: {layer: [d]}.

    Reads each prompt's activations like `caa_vectors` (pooling: "last" by default, "mean", or a
    read position), takes the paired differences per layer and their first principal component
    (`pca_direction`: centered like repeng's pca_diff unless center=False), signed so that the
    positive prompt projects higher in at least half of the pairs.

    normalize: "unit" (default: norm 1, as repeng) or "mean_norm" (norm = the mean activation
    norm at the layer, so strength s adds s typical hidden-state lengths); "raw" is the same as
    "unit" here, since a principal component has no length of its own.
    """
    pos, neg = _contrastive(model, pairs, layers, tokenizer, pooling, batch_size, progress)
    return _normalized({layer: pca_direction(pos[layer], neg[layer], center=center) for layer in pos},
                       pos, neg, normalize)


def plans_from_vectors(vectors: Mapping[int, torch.Tensor], strength: float = 1.0) -> dict[int, SteeringPlan]:
    """One additive plan per layer, ready for `actshift.patch(model, steering=...)`.

    Args:
        vectors: {layer: vector [d]} (e.g. from `caa_vectors`, `pca_vectors` or `load`), finite
            and non-zero; layers are 0-based decoder blocks, steered at their block output.
        strength: λ of every plan: each layer adds strength·vector to every token's hidden state.
            What a strength means depends on the vectors' norms (see `normalize` in caa_vectors).

    Returns:
        {layer: SteeringPlan(add=vector, strength=strength)}; the plans' repr shows the norms.
    """
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty {layer: tensor [d]} mapping")
    return {layer: SteeringPlan(add=_check_vector(v, None, f"vectors[{layer}]"), strength=strength)
            for layer, v in vectors.items()}


# --- ActAdd -----------------------------------------------------------------------------------------


def actadd_vectors(model, tokenizer, positive: str, negative: str, layer: int, *,
                   site: str = "block_input") -> torch.Tensor:
    """ActAdd (Turner et al.): per-position activation difference of a prompt pair, [n, d].

    Both prompts must tokenize to the same number of tokens n (pad the shorter one yourself, e.g.
    with spaces, as the paper does). The result is added at the first n positions of a prompt
    (`actadd_sites`); ActAdd reads and writes the residual stream entering `layer` (block_input).
    """
    if not isinstance(positive, str) or not isinstance(negative, str):
        raise TypeError("positive and negative must be strings")
    n_pos = len(tokenizer(positive)["input_ids"])
    n_neg = len(tokenizer(negative)["input_ids"])
    if n_pos != n_neg:
        raise ValueError(f"positive and negative must have the same number of tokens, got {n_pos} and {n_neg}")
    if n_pos == 0:
        raise ValueError("positive and negative tokenize to no tokens")
    kwargs = dict(tokenizer=tokenizer, site=site, pooling=None, progress=False)
    pos = extract_activations(model, [positive], layer, **kwargs)
    neg = extract_activations(model, [negative], layer, **kwargs)
    (key,) = pos
    return pos[key] - neg[key]


def actadd_sites(vectors: torch.Tensor, layer: int, *, strength: float = 1.0, attention_mask=None,
                 site: str = "block_input") -> list:
    """SteeringSites that add vectors[j] at the j-th real token of each prompt (j < n).

    Args:
        vectors: [n, d] from `actadd_vectors`.
        layer: the decoder layer.
        strength: ActAdd's coefficient.
        attention_mask: the batch's [batch, L] mask (left or right padding); None = one unpadded row.
            Row b's prompt starts at its first non-pad token, and the masks address absolute
            positions, so cached generation steers the prompt front only.
    """
    from ..integrations.transformers import SteeringSite

    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError("vectors must be [n >= 1, d]")
    n = vectors.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones(1, n, dtype=torch.long)
    mask = torch.as_tensor(attention_mask).bool()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, L], got shape {tuple(mask.shape)}")
    start = mask.long().argmax(1)  # the first real token of each row
    lengths = mask.sum(1)
    if bool((lengths < n).any()):
        raise ValueError(f"attention_mask: every prompt needs at least {n} tokens for {n} ActAdd positions")
    rows = torch.arange(mask.shape[0])
    sites = []
    for j in range(n):
        positions = torch.zeros_like(mask)
        positions[rows, start + j] = True
        sites.append(SteeringSite(plan=SteeringPlan(add=vectors[j], strength=strength), layers=[layer],
                                  site=site, positions=positions))
    return sites


# --- directional ablation ----------------------------------------------------------------------------


def ablation_sites(direction: torch.Tensor, num_layers: int) -> list:
    """Refusal-direction style ablation: project the unit direction out of the residual stream
    everywhere, x ← x − (x·û) û, at layer 0's block input and every block's output (each block's
    output is the next block's input, so every residual state is covered once)."""
    from ..integrations.transformers import SteeringSite

    u = _check_vector(direction, None, "direction")
    plan = SteeringPlan().ablate(u / u.norm())
    return [SteeringSite(plan=plan, layers=[0], site="block_input"),
            SteeringSite(plan=plan, layers=list(range(num_layers)), site="block_output")]


def ablate_direction(model, direction: torch.Tensor, **patch_kwargs):
    """Patches `model` to ablate `direction` at every layer (see `ablation_sites`); returns the handle."""
    from ..integrations.transformers import patch

    _check_vector(direction, hidden_size(model), "direction")
    return patch(model, steering=ablation_sites(direction, len(decoder_layers(model))), **patch_kwargs)


# --- Linear-AcT / LinEAS affine maps -----------------------------------------------------------------

AFFINE_METHODS = ("quantile", "meanstd")


def _quantiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """Per-column values at n evenly spaced quantile levels (the sorted column when it has n rows)."""
    xs = x.sort(0).values
    if xs.shape[0] == n:
        return xs
    levels = torch.linspace(0, 1, n, dtype=x.dtype)
    return torch.quantile(xs, levels, dim=0)


def fit_affine(source: torch.Tensor, target: torch.Tensor, method: str = "quantile",
               eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension affine transport map x ↦ scale ⊙ x + bias from source to target activations.

    Args:
        source, target: [n_s, d] and [n_t, d] activations (e.g. token activations of toxic and
            non-toxic text); the row counts may differ.
        method: "quantile" (Linear-AcT): in 1-D the optimal transport map is the monotone quantile
            map, and Linear-AcT fits it with a line: least squares of the sorted target on the
            sorted source, per dimension (at min(n_s, n_t) common quantile levels). "meanstd":
            match mean and standard deviation, scale = σ_t / σ_s, bias = μ_t − scale·μ_s.
        eps: floor of the source variance; constant source dims get scale 1 and a mean shift.

    Returns:
        (scale [d], bias [d]) in fp32.
    """
    if method not in AFFINE_METHODS:
        raise ValueError(f"method must be one of {', '.join(AFFINE_METHODS)}; got {method!r}")
    for name, t in (("source", source), ("target", target)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise TypeError(f"{name} must be a floating-point tensor [n, d]")
        if t.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows to fit a map, got {t.shape[0]}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source has hidden size {source.shape[1]} but target has {target.shape[1]}")
    s, t = source.double(), target.double()
    if method == "quantile":
        n = min(s.shape[0], t.shape[0])
        s, t = _quantiles(s, n), _quantiles(t, n)
    mu_s, mu_t = s.mean(0), t.mean(0)
    var_s = s.var(0, unbiased=False)
    flat = var_s <= eps
    if method == "quantile":
        scale = ((s - mu_s) * (t - mu_t)).mean(0) / var_s.clamp_min(eps)
    else:
        scale = t.std(0, unbiased=False) / var_s.clamp_min(eps).sqrt()
    scale = torch.where(flat, torch.ones_like(scale), scale)
    bias = mu_t - scale * mu_s
    return scale.float(), bias.float()


def affine_plan(source: torch.Tensor, target: torch.Tensor, method: str = "quantile",
                strength: float = 1.0) -> SteeringPlan:
    """A plan with the fitted affine part (Linear-AcT's strength λ interpolates x and the map)."""
    scale, bias = fit_affine(source, target, method)
    return SteeringPlan(strength=strength).affine(scale, bias)


# --- neuron edits (AUSteer, language neurons) ---------------------------------------------------------

NEURON_SCORES = ("cohen_d", "mean_diff")


def neuron_scores(positive: torch.Tensor, negative: torch.Tensor, score: str = "cohen_d") -> torch.Tensor:
    """Per-neuron contrast [d]: "mean_diff" = μ⁺ − μ⁻; "cohen_d" = (μ⁺ − μ⁻) / pooled σ (ε-floored).

    The sets need not be paired (rows are samples or tokens of each class).
    """
    if score not in NEURON_SCORES:
        raise ValueError(f"score must be one of {', '.join(NEURON_SCORES)}; got {score!r}")
    for name, t in (("positive", positive), ("negative", negative)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty floating-point tensor [n, d]")
    if positive.shape[1] != negative.shape[1]:
        raise ValueError(f"positive has hidden size {positive.shape[1]} but negative has {negative.shape[1]}")
    p, n = positive.double(), negative.double()
    diff = p.mean(0) - n.mean(0)
    if score == "mean_diff":
        return diff.float()
    pooled = ((p.var(0, unbiased=False) + n.var(0, unbiased=False)) / 2).sqrt().clamp_min(1e-8)
    return (diff / pooled).float()


def select_neurons(positive: torch.Tensor, negative: torch.Tensor, k: int, score: str = "cohen_d") -> torch.Tensor:
    """The k neurons with the largest |score| (descending), as an int64 index tensor."""
    scores = neuron_scores(positive, negative, score)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[0]:
        raise ValueError(f"k must be an int in [1, {scores.shape[0]}], got {k!r}")
    return scores.abs().topk(k).indices


def neuron_plan(positive: torch.Tensor, negative: torch.Tensor, k: int, *, mode: str = "set",
                factor: float = 2.0, score: str = "cohen_d", strength: float = 1.0) -> SteeringPlan:
    """Edits the top-k contrastive neurons: mode "set" writes each neuron's positive-class mean
    (language-neuron style: force the target language's activation), "multiply" scales it by
    `factor` (AUSteer-style amplification)."""
    if mode not in ("set", "multiply"):
        raise ValueError(f'mode must be "set" or "multiply", got {mode!r}')
    idx = select_neurons(positive, negative, k, score)
    # A plan of neurons alone has no hidden size; a zero add vector pins d (adding 0 is exact).
    base = SteeringPlan(add=torch.zeros(positive.shape[1]), strength=strength)
    if mode == "set":
        return base.neurons(idx, mul=0.0, add=positive.double().mean(0)[idx].float())
    return base.neurons(idx, mul=factor, add=0.0)


# --- CAST: conditional steering decided once per prompt --------------------------------------------


def cast_similarity(h_mean: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """CAST's condition score per row: cos(h̄, tanh(P h̄)) with P = c cᵀ / (cᵀc), h̄ [rows, d]."""
    c = condition.to(h_mean.dtype)
    proj = (h_mean @ c / (c @ c))[:, None] * c
    return torch.nn.functional.cosine_similarity(h_mean, torch.tanh(proj), dim=-1)


class ConditionalSteering:
    """CAST (Lee et al.): steer a generation only if its prompt matches a condition.

    The condition is scored once per row on the prompt (the prefill): CAST's similarity
    cos(h̄, tanh(P h̄)) of the mean prompt hidden state h̄ at each condition layer's block output,
    compared with `threshold` ("<" or ">": which side means "condition met"; several layers act as
    OR, as in CAST). The decision is held for the whole generation as a per-row weight of the
    behavior sites (set through the patch handle after the prefill), so prompt tokens are not
    steered and every generated token of a matching row is (CAST's apply_behavior_on_first_call=False).

    Use it as a context manager or call `close()`; `decision` holds the last prompt's [batch] bools.
    """

    def __init__(self, model, behavior: Mapping[int, SteeringPlan], condition: Mapping[int, torch.Tensor],
                 threshold: float, *, compare: str = ">", backend: str = "auto"):
        from ..integrations.transformers import SteeringSite, patch

        if compare not in (">", "<"):
            raise ValueError(f'compare must be ">" or "<", got {compare!r}')
        if not isinstance(condition, Mapping) or not condition:
            raise ValueError("condition must be a non-empty {layer: vector [d]} mapping")
        if not isinstance(behavior, Mapping) or not behavior:
            raise ValueError("behavior must be a non-empty {layer: SteeringPlan} mapping")
        blocks = decoder_layers(model)
        d = hidden_size(model)
        self.condition = {check_layers(layer, len(blocks), "condition")[0]: _check_vector(v, d, f"condition[{layer}]")
                          for layer, v in condition.items()}
        self.threshold, self.compare = float(threshold), compare
        self.decision: torch.Tensor | None = None
        sites = [SteeringSite(plan=plan, layers=[layer], name="cast") for layer, plan in behavior.items()]
        self.handle = patch(model, steering=sites, backend=backend)
        self._means: dict[int, torch.Tensor] = {}
        self._batch: int | None = None
        self._mask: torch.Tensor | None = None
        self._hooks = [blocks[layer].register_forward_hook(self._reader(layer), with_kwargs=True)
                       for layer in self.condition]
        self._remove_step = self.handle.on_step(self._on_step)

    def _reader(self, layer: int):
        def hook(module, args, kwargs, output):
            step = self.handle.step
            if step is not None and step.past_length == 0:  # the prefill: the prompt itself
                h = output[0] if isinstance(output, tuple) else output
                mask = self._mask
                if mask is None:
                    self._means[layer] = h.float().mean(1)
                else:
                    w = mask.to(h.device, torch.float32)[..., None]
                    self._means[layer] = (h.float() * w).sum(1) / w.sum(1)
        return hook

    def _on_step(self, handle, step) -> None:
        if step.past_length == 0:  # prefill: read the prompt, do not steer it
            self._means.clear()
            self.decision = None
            if self._batch is None:
                raise RuntimeError("run the generation through ConditionalSteering.generate")
            handle.set_weights({"cast": torch.zeros(self._batch)})
        elif self.decision is None:  # first decode step: decide from the prompt, then hold
            met = None
            for layer, c in self.condition.items():
                sim = cast_similarity(self._means[layer], c.to(self._means[layer].device))
                hit = sim > self.threshold if self.compare == ">" else sim < self.threshold
                met = hit if met is None else met | hit
            self.decision = met.cpu()
            handle.set_weights({"cast": met.float()})

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """`model.generate` with the condition read from this prompt (the mask excludes padding)."""
        self._batch = input_ids.shape[0]
        self._mask = attention_mask
        return self.handle.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def close(self) -> None:
        """Removes the condition hooks and unpatches the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._remove_step()
        self.handle.unpatch()

    def __enter__(self) -> ConditionalSteering:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- persona monitoring ------------------------------------------------------------------------------


def monitor_sites(vectors: Mapping[int, torch.Tensor]) -> list:
    """Persona-vector monitoring: per-token projections x·v̂ on each layer's (unit) persona vector,
    read at the block output without changing it; with `actshift.patch(model, steering=sites)`
    the handle's `monitors[(layer, "block_output")]` holds [batch, seq, 1] of the last forward."""
    from ..integrations.transformers import SteeringSite

    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty {layer: tensor [d]} mapping")
    sites = []
    for layer, v in vectors.items():
        v = _check_vector(v, None, f"vectors[{layer}]")
        sites.append(SteeringSite(plan=SteeringPlan().monitor(v / v.norm()), layers=[layer]))
    return sites


class PersonaMonitor:
    """Persona monitoring over whole generations (persona-vectors style): patches `model` with
    `monitor_sites(vectors)` and keeps every forward's per-token projections, so after a
    `model.generate(...)` `projections()` gives {layer: [batch, tokens]} for the prompt and every
    generated token that went through the model (all but the last). A new prefill starts a new log.
    Use it as a context manager or call `close()`.
    """

    def __init__(self, model, vectors: Mapping[int, torch.Tensor], *, backend: str = "auto"):
        from ..integrations.transformers import patch

        d = hidden_size(model)
        n = len(decoder_layers(model))
        for layer, v in vectors.items() if isinstance(vectors, Mapping) else ():
            check_layers(layer, n, "vectors")
            _check_vector(v, d, f"vectors[{layer}]")
        sites = monitor_sites(vectors)
        self.layers = [site.layers[0] % n for site in sites]
        self.handle = patch(model, steering=sites, backend=backend)
        self._log: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._remove_step = self.handle.on_step(self._on_step)

    def _take(self, keep: bool) -> None:
        for layer in self.layers:
            m = self.handle.monitors.pop((layer, "block_output"), None)
            if m is not None and keep:
                self._log[layer].append(m[..., 0].detach().float().cpu())

    def _on_step(self, handle, step) -> None:
        new_generation = step.past_length == 0
        self._take(keep=not new_generation)
        if new_generation:
            for log in self._log.values():
                log.clear()

    def projections(self) -> dict[int, torch.Tensor]:
        """{layer: [batch, tokens] fp32} of the current generation (or forward) so far."""
        self._take(keep=True)
        return {layer: torch.cat(log, dim=-1) if log else torch.empty(0) for layer, log in self._log.items()}

    def close(self) -> None:
        """Unpatches the model."""
        self._remove_step()
        self.handle.unpatch()

    def __enter__(self) -> PersonaMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- dynamic composition -----------------------------------------------------------------------------


def compose(model, plans: Mapping[str, Mapping[int, SteeringPlan]],
            weights: Callable[[object, object], Mapping[str, torch.Tensor]], **patch_kwargs):
    """Dynamic composition (DAC-style): several named steering programs whose per-row weights a
    callback sets before every forward (prefill and each generated token).

    Args:
        model: a transformers model.
        plans: {name: {layer: SteeringPlan}}, e.g. {"formal": {...}, "french": {...}}.
        weights: fn(handle, step) -> {name: tensor [batch]}; `step.past_length` is the number of
            cached tokens (0 at the prefill). Weights multiply each plan's whole intervention.

    Returns:
        The patch handle (unpatch it when done).
    """
    from ..integrations.transformers import SteeringSite, patch

    if not isinstance(plans, Mapping) or not plans:
        raise ValueError("plans must be a non-empty {name: {layer: plan}} mapping")
    if not callable(weights):
        raise TypeError("weights must be a callable (handle, step) -> {name: tensor [batch]}")
    sites = []
    for name, per_layer in plans.items():
        if not isinstance(name, str):
            raise TypeError(f"plans keys must be names (str), got {name!r}")
        if not isinstance(per_layer, Mapping) or not per_layer:
            raise ValueError(f"plans[{name!r}] must be a non-empty {{layer: plan}} mapping")
        sites += [SteeringSite(plan=plan, layers=[layer], name=name) for layer, plan in per_layer.items()]
    handle = patch(model, steering=sites, **patch_kwargs)
    handle.on_step(lambda h, step: h.set_weights(dict(weights(h, step))))
    return handle
