"""Activation extraction: per-layer hidden states of a transformers model, pooled per input.

Hooks read the chosen site of each requested decoder layer during ordinary batched forwards; the
forward stops right after the deepest requested layer, so reading early layers costs only those.
Padding is respected: pooling ignores pad tokens, and position ids are derived from the attention
mask, so a left-padded input gives the same activations as the same input alone.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..integrations import architectures

SITES = architectures.SITES
POOLINGS = ("last", "mean", None)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder (or encoder) blocks (see actshift.integrations.architectures)."""
    return architectures.blocks(model)


hidden_size = architectures.hidden_size


def check_layers(layers, num_layers: int, name: str = "layers") -> list[int]:
    """Normalizes an int or a sequence of ints (negative counts from the end) to sorted unique indices."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(layers).__name__}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must hold ints, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"{name}: layer {layer} is out of range for a model with {num_layers} layers")
        out.append(layer % num_layers)
    if not out:
        raise ValueError(f"{name} must name at least one layer")
    return sorted(set(out))


def _first_tensor(value) -> torch.Tensor:
    """Blocks return a tensor or a tuple whose first element is the hidden states."""
    return value[0] if isinstance(value, (tuple, list)) else value


class _Stop(Exception):
    """Raised by the deepest hook: nothing after it is needed."""


def _progress(total: int, enabled: bool | None, desc: str):
    """tqdm where installed (shown at once for True; for None only once the work has run for a
    second), else for True a one-line counter on stderr; None when there is no bar."""
    if enabled is False:
        return None
    from ..sparse.calibrate import PROGRESS_DELAY_S

    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleBar(total, desc) if enabled else None
    return tqdm(total=total, desc=desc, unit="input", delay=0.0 if enabled else PROGRESS_DELAY_S)


class _SimpleBar:
    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc = total, 0, desc

    def update(self, k: int) -> None:
        self.n += k
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def _batches(inputs, tokenizer, batch_size: int):
    """Yields (input_ids [b, T], attention_mask [b, T]) batches from strings or token tensors."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("inputs['input_ids'] must be a [n, seq] integer tensor")
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"inputs['attention_mask'] must match input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if ids.shape[0] == 0:
            raise ValueError("inputs must hold at least one input")
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("inputs['attention_mask'] has a row with no tokens")
        for start in range(0, ids.shape[0], batch_size):
            yield ids[start:start + batch_size], mask[start:start + batch_size]
        return
    if not isinstance(inputs, Sequence) or not all(isinstance(s, str) for s in inputs):
        raise TypeError("inputs must be strings, a [n, seq] token tensor or a dict with input_ids/attention_mask")
    if not inputs:
        raise ValueError("inputs must hold at least one input")
    if tokenizer is None:
        raise ValueError("tokenizer is required when inputs are strings")
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start:start + batch_size])
        if len(chunk) > 1 and getattr(tokenizer, "pad_token", None) is None:
            yield _pad_ourselves(tokenizer, chunk)
            continue
        enc = tokenizer(chunk, return_tensors="pt", padding=len(chunk) > 1)
        yield enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))


def _pad_ourselves(tokenizer, chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches strings for a tokenizer without a pad token (many base LMs) without changing it:
    each string alone, right-padded with any id (the attention mask hides it, positions come from
    the mask and pooling skips it)."""
    rows = [torch.as_tensor(tokenizer(s)["input_ids"], dtype=torch.long).reshape(-1) for s in chunk]
    ids = torch.zeros(len(rows), max(r.numel() for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def _check_pooling(pooling, n: int):
    """pooling as given ("last", "mean", None), or an int64 [n] index per input, or a bool [n, L]
    token mask; ValueError/TypeError naming `pooling` otherwise."""
    if not isinstance(pooling, torch.Tensor) and pooling in POOLINGS:
        return pooling
    if isinstance(pooling, (bool, str)):
        raise ValueError(f"pooling must be 'last', 'mean', None, a token index, one index per input or a bool mask; "
                         f"got {pooling!r}")
    if isinstance(pooling, int):
        return torch.full((n,), pooling, dtype=torch.int64)
    t = pooling if isinstance(pooling, torch.Tensor) else torch.as_tensor(pooling)
    if t.dtype == torch.bool:
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"pooling as a token mask must be bool [{n} inputs, L], got shape {tuple(t.shape)}")
        return t.cpu()
    if t.is_floating_point() or t.is_complex() or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"pooling as token indices must be an int or {n} ints (one per input), got "
                         f"{t.dtype} with shape {tuple(t.shape)}")
    return t.cpu().long()


def _pool(h: torch.Tensor, mask: torch.Tensor, pooling, start: int = 0) -> torch.Tensor:
    h = h.float()
    m = mask.to(h.device, torch.bool)
    if isinstance(pooling, torch.Tensor):  # positions counted over each input's own (non-pad) tokens
        rank = m.long().cumsum(1) - 1  # j for the j-th real token, whatever the padding side
        lens = m.sum(1)
        rows = pooling[start:start + h.shape[0]].to(h.device)
        if rows.dtype == torch.bool:
            cols = rank.clamp(0, rows.shape[1] - 1)
            sel = m & (rank < rows.shape[1]) & torch.gather(rows, 1, cols)
            empty = (~sel.any(1)).nonzero()
            if empty.numel():
                raise ValueError(f"pooling mask selects no token of input {start + int(empty[0])}")
            w = sel.to(h.dtype)[..., None]
            return (h * w).sum(1) / w.sum(1)
        target = torch.where(rows < 0, lens + rows, rows)
        bad = ((target < 0) | (target >= lens)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"pooling index {int(rows[i])} is out of range for input {start + i}, "
                             f"which has {int(lens[i])} tokens")
        pos = (m & (rank == target[:, None])).long().argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), pos]
    if pooling == "last":  # the last non-pad position, whichever side the padding is on
        pos = torch.arange(m.shape[1], device=h.device)
        last = torch.where(m, pos, -1).amax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if pooling == "mean":
        w = m.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)
    return h[m]  # every non-pad token, input-major


def extract_activations(
    model: torch.nn.Module,
    inputs,
    layers,
    *,
    tokenizer=None,
    site: str = "block_output",
    pooling: str | None = "last",
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Runs `model` on `inputs` and returns each requested layer's activations, fp32 on CPU.

    Args:
        model: a transformers model of a type in actshift.integrations.architectures.
        inputs: strings (with `tokenizer`), a [n, seq] token-id tensor, or a dict with `input_ids`
            and `attention_mask` (left or right padding).
        layers: a layer index or indices (0-based decoder blocks; negative counts from the end).
        site: "block_output" (the residual stream after the block, = hidden_states[layer + 1] of
            output_hidden_states for all but the last layer, whose hidden_states entry is normed),
            "block_input", "attention_output" or "mlp_output".
        pooling: "last" (the last non-pad token), "mean" (mean over non-pad tokens), None
            (every non-pad token, concatenated input by input: [total_tokens, d]), or a read
            position: an int token index (negative counts from the end: -1 is "last", -2 the
            token before it, steering-vectors' read_token_index=-2), one index per input (a
            sequence or int tensor [n]), or a bool mask [n, L] whose selected tokens are averaged.
            Indices and mask columns count each input's own tokens, left to right, whatever the
            padding side (column j = its j-th non-pad token; columns past its length are ignored).
        batch_size: inputs per forward pass.
        progress: a progress bar (tqdm when installed): True, False, or None (default) to show it
            only once the extraction has taken more than a second.

    Returns:
        {layer: tensor [n, d]} (or [total_tokens, d] for pooling=None), keyed by the non-negative
        layer index.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}; got {site!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    arch = architectures.architecture(model)
    blocks = architectures.blocks(model, arch)
    layers = check_layers(layers, len(blocks))
    batches = list(_batches(inputs, tokenizer, batch_size))
    total = sum(ids.shape[0] for ids, _ in batches)
    pooling = _check_pooling(pooling, total)
    params = inspect.signature(model.forward).parameters

    captured: dict[int, torch.Tensor] = {}
    deepest = layers[-1]

    def make_hook(index: int, pre: bool):
        def hook(module, args, kwargs, output=None):
            if pre:
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            else:
                h = _first_tensor(output)
            captured[index] = h.detach()
            if index == deepest:
                raise _Stop
        return hook

    handles = []
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    bar = _progress(total, progress, "extracting")
    try:
        for layer in layers:
            module = architectures.site_module(arch, blocks[layer], site, layer)
            pre = site == "block_input"
            if pre:
                handles.append(module.register_forward_pre_hook(make_hook(layer, True), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, k, o, f=make_hook(layer, False): f(m, a, k, o), with_kwargs=True))
        device = next(model.parameters()).device
        start = 0
        for ids, mask in batches:
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if "use_cache" in params:
                kwargs["use_cache"] = False
            if "position_ids" in params:  # positions count real tokens only, so left padding changes nothing
                kwargs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0).to(device)
            captured.clear()
            with torch.inference_mode():
                try:
                    model(**kwargs)
                except _Stop:
                    pass
            for layer in layers:
                out[layer].append(_pool(captured[layer], mask, pooling, start).cpu())
            start += ids.shape[0]
            if bar is not None:
                bar.update(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}
