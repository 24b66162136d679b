"""The offline digits evaluation end to end (few epochs): every method, metrics in range, sign conventions."""

import math

from actshift import cli
from actshift.ood import METHODS, digits


def test_digits_evaluation_runs_every_method():
    lines = []
    results = digits.main(seed=0, epochs=5, print_fn=lines.append)
    assert list(results) == list(METHODS)
    for method, row in results.items():
        assert 0.9 < row["acc"] <= 1.0, method  # a working classifier, also after shaping
        for group in ("near", "noise", "shuffled", "far"):
            assert set(row[group]) == {"AUROC", "AUPR_IN", "AUPR_OUT", "FPR@95", "FPR@95_id_positive"}
            assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in row[group].values()), (method, group)
    # Uniform noise is far from any digit: energy must rank ID above it (conf = higher is ID).
    assert results["energy"]["noise"]["AUROC"] > 0.8
    assert results["energy"]["far"]["FPR@95"] < 0.5
    table = "\n".join(lines)
    assert all(method in table for method in METHODS)


def test_cli_ood_eval(capsys):
    assert cli.main(["ood-eval", "--epochs", "2", "--seed", "1", "--methods", "energy,scale"]) == 0
    out = capsys.readouterr().out
    assert "energy" in out and "scale" in out and "adascale_a" not in out
