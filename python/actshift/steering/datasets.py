"""Contrastive pairs from a template and personas, repeng's `make_dataset` recipe.

    pairs = make_pairs("Act as if you're extremely {persona}.", ["happy", "joyous"], ["sad", "miserable"],
                       suffixes=truncated_suffixes(["I feel", "The weather is"], tok), tokenizer=tok)

Each suffix × each (positive, negative) persona pair gives one pair of prompts that differ only in
the persona. With a tokenizer that has a chat template, the persona sentence is the user turn and
the suffix is the start of the assistant's answer (the generation prompt, then the suffix); without
one, user_tag and assistant_tag frame it, as repeng's notebooks do with "[INST]" / "[/INST]".
"""
from __future__ import annotations

from collections.abc import Sequence


def _strings(value, name: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of strings")
    if not all(isinstance(s, str) for s in value):
        raise TypeError(f"{name} must hold strings only")
    return list(value)


def _chat_prompt(tokenizer, user: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_pairs(template: str, positive_personas: Sequence[str], negative_personas: Sequence[str],
               suffixes: Sequence[str] = ("",), *, tokenizer=None, system: str | None = None,
               user_tag: str = "", assistant_tag: str = "") -> list[tuple[str, str]]:
    """(positive, negative) prompt pairs for `caa_vectors`, `pca_vectors` or `SteeringVector.train`.

    Args:
        template: the user turn with a "{persona}" field, e.g. "Pretend you're an {persona} person.".
        positive_personas, negative_personas: equally long lists, paired by position.
        suffixes: starts of the answer appended to both prompts (see `truncated_suffixes`).
        tokenizer: if given, its chat template formats the prompt (ValueError if it has none).
        system: a system turn for the chat template.
        user_tag, assistant_tag: without a tokenizer, the prompt is
            "{user_tag} {template} {assistant_tag} {suffix}" (empty parts left out).

    Returns:
        len(suffixes) · len(personas) pairs, suffix-major (repeng's order).
    """
    if not isinstance(template, str) or "{persona}" not in template:
        raise ValueError('template must be a string with a "{persona}" field')
    positives = _strings(positive_personas, "positive_personas")
    negatives = _strings(negative_personas, "negative_personas")
    if len(positives) != len(negatives):
        raise ValueError(f"positive_personas ({len(positives)}) and negative_personas ({len(negatives)}) "
                         "must have the same length: they are paired by position")
    suffixes = _strings(suffixes, "suffixes")
    if tokenizer is not None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "tokenizer has no chat_template; set one, or pass user_tag/assistant_tag without a tokenizer")
        if user_tag or assistant_tag:
            raise ValueError(
                "user_tag/assistant_tag are for prompts without a chat template; the tokenizer formats turns")
    elif system is not None:
        raise ValueError("system needs a tokenizer with a chat template")

    def prompt(persona: str, suffix: str) -> str:
        user = template.format(persona=persona)
        if tokenizer is not None:
            return _chat_prompt(tokenizer, user, system) + suffix
        return " ".join(part for part in (user_tag, user, assistant_tag, suffix) if part)

    return [(prompt(p, suffix), prompt(n, suffix))
            for suffix in suffixes for p, n in zip(positives, negatives)]


def truncated_suffixes(texts: Sequence[str], tokenizer, *, max_tokens: int | None = None) -> list[str]:
    """Every proper token prefix of each text, decoded (lengths 1 .. tokens − 1): repeng's way of
    making many suffixes from a few sentences ("I feel so" -> "I", "I feel"). `max_tokens` caps
    each prefix's length."""
    texts = _strings(texts, "texts")
    bad = isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    if max_tokens is not None and bad:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    out = []
    for text in texts:
        tokens = tokenizer.tokenize(text)
        stop = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
        out += [tokenizer.convert_tokens_to_string(tokens[:i]) for i in range(1, stop)]
    if not out:
        raise ValueError("texts: every text is a single token, so there are no proper prefixes")
    return out
