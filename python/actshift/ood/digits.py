"""An offline OOD evaluation on scikit-learn's bundled digits (`actshift ood-eval`), seconds on a CPU.

Data (load_digits: 1,797 grey 8×8 images, pixel values 0–16, no download):
- ID: digits 0–5, split 60 % train / 10 % val (ID statistics for ReAct and AdaSCALE) / 30 % test;
- near-OOD: every image of digits 6–9;
- far-OOD: "noise", uniform pixels in [0, 16]; "shuffled", the ID test images with their pixels
  permuted (a different permutation per image): the same intensity histogram, no digit shape.
Inputs are scaled to [0, 1] and standardized with the training set's mean and standard deviation,
so AdaSCALE's ε = 0.5 is in units of about one input standard deviation, as on ImageNet.

Classifier: an MLP 64 → 256 → 256 (ReLU) → 6, Adam; the postprocessors see z = the second ReLU
layer (D = 256) and the last Linear as the head.

Reported per method: ID test accuracy of its (shaped) predictions, and AUROC and FPR@95 in both
conventions (see metrics.py) for near-OOD and for far-OOD (the mean over noise and shuffled, as
OpenOOD averages datasets), plus the AUROC of each far-OOD set. This toy benchmark checks the
pipeline and the sign conventions; whether shaping beats energy here depends on the seed, unlike on
ImageNet-scale CNNs (research notes §6), so read its numbers as a smoke test, not a ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.datasets import load_digits

from .adapters import FeatureClassifier
from .metrics import ood_metrics
from .postprocessors import METHODS, make_postprocessor

ID_CLASSES = 6  # digits 0-5
FAR_SETS = ("noise", "shuffled")
Labelled = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)


def load_sets(seed: int) -> dict[str, Labelled]:
    """{name: (x [N, 64] standardized fp32, y [N])} for id_train, id_val, id_test, near, noise,
    shuffled; OOD labels are −1."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    pixels, labels = digits.data.astype(np.float32) / 16.0, digits.target
    is_id = labels < ID_CLASSES
    order = rng.permutation(np.flatnonzero(is_id))
    n_train, n_val = int(0.6 * order.size), int(0.1 * order.size)
    parts = {
        "id_train": order[:n_train],
        "id_val": order[n_train : n_train + n_val],
        "id_test": order[n_train + n_val :],
    }
    raw = {name: pixels[idx] for name, idx in parts.items()}
    raw["near"] = pixels[~is_id]
    n_test = raw["id_test"].shape[0]
    raw["noise"] = rng.uniform(0.0, 1.0, size=(n_test, pixels.shape[1])).astype(np.float32)
    raw["shuffled"] = np.stack([row[rng.permutation(row.size)] for row in raw["id_test"]])
    mean, std = raw["id_train"].mean(), raw["id_train"].std()
    sets = {}
    for name, x in raw.items():
        y = labels[parts[name]] if name in parts else np.full(x.shape[0], -1)
        sets[name] = (torch.from_numpy((x - mean) / std), torch.from_numpy(y).long())
    return sets


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list[Labelled]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs the block with one intra-op thread: these matrices are too small to split, and thread
    hand-offs cost more than the math (10× more on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> FeatureClassifier:
    """The MLP of the module docstring, trained with Adam (lr 1e-3, batches of 64), in eval mode."""
    torch.manual_seed(seed)
    features = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()
    )
    head = torch.nn.Linear(256, ID_CLASSES)
    model = torch.nn.Sequential(features, head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    return FeatureClassifier(features, head)


# ViM's principal dimension must be below D = 256 here (OpenOOD's default, 256, is for D = 512).
OPTIONS = {"vim": {"dim": 128}}


def evaluate(clf: FeatureClassifier, sets: dict[str, Labelled], methods: Sequence[str]) -> dict[str, dict]:
    """{method: {"acc": ID test accuracy, "near"/"noise"/"shuffled"/"far": ood_metrics dict}}."""
    results = {}
    for method in methods:
        pp = make_postprocessor(method, **OPTIONS.get(method, {}))
        # As in OpenOOD: MDS, KNN and ViM fit on the training set, the others on validation data.
        pp.setup(clf, {"train": batches(*sets["id_train"]), "val": batches(*sets["id_val"])}, {})
        pred, id_conf, label = pp.inference(clf, batches(*sets["id_test"]))
        row = {"acc": float((pred == label).mean())}
        for name in ("near",) + FAR_SETS:
            row[name] = ood_metrics(id_conf, pp.inference(clf, batches(*sets[name]))[1])
        row["far"] = {key: float(np.mean([row[name][key] for name in FAR_SETS])) for key in row["near"]}
        results[method] = row
    return results


def format_table(results: dict[str, dict]) -> str:
    """A text table of `evaluate`'s results, in percent."""
    metrics = f"{'AUROC':>7s} {'FPR95':>8s} {'FPR95id':>8s}"
    head1 = (
        f"{'':19s} | {'near-OOD (digits 6-9)':^26s} | {'far-OOD (mean)':^26s} | {'AUROC per far set':^17s}"
    )
    head2 = f"{'method':12s} {'ID acc':>6s} | {metrics} | {metrics} | {'noise':>8s} {'shuffled':>8s}"
    lines = [head1, head2, "-" * len(head2)]
    for method, row in results.items():
        cells = [f"{method:12s} {100 * row['acc']:6.1f}"]
        for group in ("near", "far"):
            m = row[group]
            cells.append(
                f"{100 * m['AUROC']:7.1f} {100 * m['FPR@95']:8.1f} {100 * m['FPR@95_id_positive']:8.1f}"
            )
        cells.append(" ".join(f"{100 * row[name]['AUROC']:8.1f}" for name in FAR_SETS))
        lines.append(" | ".join(cells))
    lines.append("FPR95:   OOD positive (OpenOOD v1.5): ID flagged as OOD at 95 % OOD recall (lower: better)")
    lines.append("FPR95id: ID positive (ReAct/ASH): OOD accepted as ID at 95 % ID recall (lower: better)")
    return "\n".join(lines)


def main(
    seed: int = 0,
    epochs: int = 60,
    methods: Sequence[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Trains the classifier, evaluates `methods` (default: all of METHODS), prints the table and
    returns `evaluate`'s results."""
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {methods!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    sets = load_sets(seed)
    with _one_thread():
        clf = train_classifier(*sets["id_train"], epochs=epochs, seed=seed)
        sizes = ", ".join(f"{name} {x.shape[0]}" for name, (x, _) in sets.items())
        print_fn(f"digits OOD evaluation: seed {seed}, {epochs} epochs, MLP 64-256-256-6 (D = 256); {sizes}")
        results = evaluate(clf, sets, methods)
    print_fn(format_table(results))
    return results
