"""The benchmark harness: derived ratios, CSV schema, table, CLI errors (no timing asserted)."""
import csv

import torch

from actshift.benchmarks import harness
from actshift.benchmarks.run import run
from actshift.cli import main


def _case(bytes_eager=600, bytes_ours=200):
    return harness.Case("steer", "add", "rows=1 d=8", torch.float32, {}, bytes_actshift=bytes_ours, bytes_eager=bytes_eager)


def test_derived_ratios_and_csv(tmp_path):
    c = _case()
    results = [
        harness.Result(c, harness.EAGER, 30.0, 29.0, 31.0),
        harness.Result(c, harness.COMPILE, 20.0, 19.0, 21.0),
        harness.Result(c, harness.COPY, 8.0, 8.0, 8.0),
        harness.Result(c, "actshift-cpu", 10.0, 9.0, 11.0),
    ]
    harness.derived(results)
    ours = results[-1].extra
    assert ours["ideal_speedup"] == 3.0
    assert ours["speedup_vs_eager"] == 3.0 and ours["pct_of_ideal"] == 100.0
    assert ours["speedup_vs_compile"] == 2.0 and ours["x_copy_time"] == 1.25
    assert abs(ours["gbps"] - 200 / 10e-6 / 1e9) < 1e-12
    path = tmp_path / "cpu.csv"
    env = harness.environment("cpu")
    harness.write_csv(str(path), results, env)
    rows = list(csv.DictReader(open(path)))
    assert [r["provider"] for r in rows] == ["eager", "torch.compile", "copy", "actshift-cpu"]
    assert set(harness.COLUMNS) == set(rows[0])
    assert rows[-1]["speedup_vs_eager"] == "3.000" and rows[0]["torch"] == torch.__version__
    text = harness.table(results)
    assert "actshift-cpu" in text and "3.00" in text


def test_quantiles():
    assert harness._quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, 2.0, 4.0)


def test_timer_measures_every_provider():
    timer = harness.Timer("cpu", quick=True)
    timer.budget_s = 0.001
    got = timer.measure({"a": lambda: None, "b": lambda: sum(range(100))})
    assert set(got) == {"a", "b"} and all(med > 0 and p20 <= med <= p80 for med, p20, p80 in got.values())


def test_bench_cli_rejects_unknown_op_and_missing_gpu(capsys):
    assert run(["nope"], "cpu", True, "unused") == 2
    assert "unknown op" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--quick"]) == 2
        assert "CUDA" in capsys.readouterr().err
