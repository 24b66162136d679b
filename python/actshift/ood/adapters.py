"""One view of a classifier for the OOD postprocessors: penultimate features z [N, D] and a linear head.

Activation shaping acts on the globally pooled penultimate features and then applies the model's
final linear layer, so every postprocessor needs exactly two things from a network:

    features(x) -> z [N, D]        head: torch.nn.Linear (logits = head(z))

`as_classifier(net)` wraps what users have:
- any object with `features` and `head` (the `Classifier` protocol), e.g. a `FeatureClassifier`;
- transformers' `ResNetForImageClassification` (z = pooler output, flattened from [N, C, 1, 1]);
- transformers' `ViTForImageClassification` (z = the final-layernorm CLS token);
- OpenOOD-style nets with `net(x, return_feature=True) -> (logits, z)` and `net.get_fc_layer()`;
- transformers' text classifiers `*ForSequenceClassification` (BERT, RoBERTa, DistilBERT, Llama,
  ...): z = the input of the final Linear (BERT's dropped-out pooler output, RoBERTa's dense+tanh
  of CLS, a decoder's last real token), head = that Linear.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Classifier(Protocol):
    """Penultimate features and the linear head that maps them to logits."""

    head: torch.nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def _linear(head, name: str) -> torch.nn.Linear:
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear (the final layer), got {type(head).__name__}")
    return head


def _rows(z: torch.Tensor) -> torch.Tensor:
    """Pooled CNN features [N, D, 1, 1] (or any [N, ...]) as [N, D]."""
    return z.flatten(1) if z.dim() > 2 else z


class FeatureClassifier:
    """A Classifier from a feature function (x -> z [N, D] or [N, D, 1, 1]) and a Linear head."""

    def __init__(self, features_fn: Callable[[torch.Tensor], torch.Tensor], head: torch.nn.Linear):
        if not callable(features_fn):
            raise TypeError(f"features_fn must be callable, got {type(features_fn).__name__}")
        self.features_fn = features_fn
        self.head = _linear(head, "head")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _rows(self.features_fn(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class HFResNetClassifier:
    """transformers' ResNetForImageClassification: z = pooler output (global average pool of the
    last stage), head = the Linear inside `model.classifier` (Flatten, Linear)."""

    def __init__(self, model):
        self.model = model
        self.head = _linear(model.classifier[-1], "model.classifier[-1]")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _rows(self.model.resnet(x).pooler_output)


class HFViTClassifier:
    """transformers' ViTForImageClassification: z = CLS token after the final layernorm, head =
    `model.classifier`."""

    def __init__(self, model):
        self.model = model
        self.head = _linear(model.classifier, "model.classifier")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.vit(x).last_hidden_state[:, 0]


class OpenOODClassifier:
    """An OpenOOD network: `net(x, return_feature=True) -> (logits, z)`, head = `net.get_fc_layer()`."""

    def __init__(self, net):
        self.net = net
        self.head = _linear(net.get_fc_layer(), "net.get_fc_layer()")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _rows(self.net(x, return_feature=True)[1])


class _Stop(Exception):
    """Raised by the head's pre-hook: the features are read, the head need not run."""


class HFTextClassifier:
    """transformers' `*ForSequenceClassification`: z = what the model feeds its final Linear, head =
    that Linear (`classifier`, `classifier.out_proj` or `score`), so logits = head(z) exactly.

    Inputs (`features(x)`): a tokenizer's output (dict or BatchEncoding with input_ids,
    attention_mask, ...), an input-id tensor [N, T], or token embeddings [N, T, H] (inputs_embeds;
    a dict may carry them with its attention_mask). Decoder classifiers (Llama, GPT-2: the head
    sees every token) are read at each row's last real token, as transformers pools them.

    `embed(x)` turns token ids into that dict with inputs_embeds, a continuous input: AdaSCALE and
    ODIN perturb text there (they call it themselves when given token ids).
    """

    def __init__(self, model):
        self.model = model
        head = getattr(model, "classifier", None)
        head = getattr(model, "score", None) if head is None else head
        head = getattr(head, "out_proj", head)  # RoBERTa/Electra-style heads end in out_proj
        name = f"{type(model).__name__}'s final layer (classifier, classifier.out_proj or score)"
        self.head = _linear(head, name)

    @staticmethod
    def _kwargs(x) -> dict:
        if isinstance(x, Mapping):
            return {k: v for k, v in x.items() if k not in ("label", "labels")}
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return {"inputs_embeds": x}
        if isinstance(x, torch.Tensor):
            return {"input_ids": x}
        raise TypeError(
            f"x must be token ids, token embeddings or a tokenizer's output dict, got {type(x).__name__}"
        )

    def embed(self, x) -> dict:
        """The same inputs with input_ids replaced by the model's token embeddings (inputs_embeds)."""
        kwargs = self._kwargs(x)
        if "input_ids" in kwargs:
            kwargs["inputs_embeds"] = self.model.get_input_embeddings()(kwargs.pop("input_ids"))
        return kwargs

    def features(self, x) -> torch.Tensor:
        kwargs = self._kwargs(x)
        captured = []

        def read(module, args):
            captured.append(args[0])
            raise _Stop

        hook = self.head.register_forward_pre_hook(read)
        try:
            self.model(**kwargs)
        except _Stop:
            pass
        finally:
            hook.remove()
        if not captured:
            raise ValueError(f"net: {type(self.model).__name__} did not call its final layer")
        z = captured[0]
        if z.dim() == 3:  # a decoder classifier scores every token, then keeps the last real one
            mask = kwargs.get("attention_mask")
            if mask is None:
                return z[:, -1]
            positions = torch.arange(z.shape[1], device=z.device)
            last = torch.where(mask.to(z.device).bool(), positions, -1).amax(1)
            return z[torch.arange(z.shape[0], device=z.device), last]
        return z


def to_device(x, device: torch.device):
    """A batch of model inputs (a tensor, or a dict of them) on `device`."""
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x.to(device)


def as_classifier(net) -> Classifier:
    """`net` as a Classifier (see the module docstring for what is accepted); TypeError otherwise.

    Known model types are recognised before the protocol, so a module that merely has attributes
    named `features` and `head` (torchvision's DenseNet has `features`) is not misread."""
    # A transformers model can only exist once transformers is imported; don't import it for others.
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        if isinstance(net, transformers.ResNetForImageClassification):
            return HFResNetClassifier(net)
        if isinstance(net, transformers.ViTForImageClassification):
            return HFViTClassifier(net)
        text = type(net).__name__.endswith("ForSequenceClassification")
        if text and isinstance(net, transformers.PreTrainedModel):
            return HFTextClassifier(net)
    if callable(getattr(net, "get_fc_layer", None)):
        return OpenOODClassifier(net)
    if isinstance(net, Classifier) and callable(net.features):
        _linear(net.head, "net.head")
        return net
    raise TypeError(
        "net must be a Classifier (features(x) and a Linear head), e.g. a FeatureClassifier, a "
        "transformers ResNetForImageClassification, ViTForImageClassification or *ForSequenceClassification, "
        "or an OpenOOD-style "
        f"net with get_fc_layer() and net(x, return_feature=True); got {type(net).__name__}"
    )


def head_features(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """clf.features(x), checked to be [N, D] with D = clf.head.in_features (ValueError naming `net`)."""
    z = clf.features(x)
    if z.dim() != 2 or z.shape[1] != clf.head.in_features:
        raise ValueError(
            f"net: its head takes {clf.head.in_features} features per sample, "
            f"but its features have shape {tuple(z.shape)}"
        )
    return z


def head_device(clf: Classifier) -> torch.device:
    """Where the classifier's inputs go: the device of its head's weight."""
    return clf.head.weight.device
