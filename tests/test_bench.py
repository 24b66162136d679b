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


def test_noise_helpers():
    assert harness.relative_spread(10.0, 9.0, 12.0) == 0.3
    assert harness.medians_differ((10.0, 9.0, 11.0), (20.0, 18.0, 22.0))
    assert not harness.medians_differ((10.0, 9.0, 15.0), (14.0, 13.0, 16.0))  # the ranges overlap
    assert harness.ratio_supported((10.0, 9.0, 11.0), (20.0, 18.0, 22.0))
    assert not harness.ratio_supported((10.0, 9.0, 11.0), (20.0, 10.0, 400.0))


def test_a_wide_spread_marks_the_ratios_noisy():
    """A baseline that jumped 100x in some repetitions gives no ratio: the table says so."""
    c = harness.Case("steer", "add", "rows=1 d=8", torch.float32, {}, bytes_actshift=200, bytes_eager=200,
                     bytes_copy=200)
    results = [
        harness.Result(c, harness.EAGER, 30.0, 29.0, 31.0),
        harness.Result(c, harness.COMPILE, 1500.0, 20.0, 3000.0),
        harness.Result(c, harness.COPY, 10.0, 10.0, 10.0),
        harness.Result(c, "actshift-cpu", 10.0, 9.5, 10.5),
    ]
    harness.derived(results, "NVIDIA H200")
    ours = results[-1].extra
    assert ours["noisy"] == [harness.COMPILE]
    line = harness.table(results).splitlines()[-1]
    assert "noisy" in line and "150.00" not in line and "3.00" in line  # vs eager stands, vs compile not
    assert ours["pct_copy_bw"] == 100.0  # the same bytes in the same time as the copy
    assert abs(ours["pct_peak_bw"] - 100 * (200 / 10e-6 / 1e9) / 4800) < 1e-9


def test_compiled_providers_compile_every_shape(monkeypatch):
    """More shapes than dynamo's recompile_limit (8) from one function: each provider is compiled
    code for its own shape, and a provider that claims to be compiled but runs eager is an error.
    (Dynamo's "eager" backend: the limit is dynamo's, and Inductor would take minutes here.)"""
    import functools

    import pytest

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    timer = harness.Timer("cpu", quick=True)
    timer.budget_s = 0.001
    for n in range(1, 11):
        x = torch.randn(n, 3)

        def add(x=x):
            return x + 1

        fn = harness.compiled(add)
        graphs = harness._graphs_compiled()
        timer.measure({harness.COMPILE: fn})
        assert harness._graphs_compiled() == graphs + 1, n
    fake = lambda: None  # noqa: E731
    fake.actshift_compiled = True
    with pytest.raises(RuntimeError, match="compiled no graph"):
        timer.measure({harness.COMPILE: fake})


def test_a_run_writes_its_own_file_unless_asked(tmp_path, monkeypatch):
    """`actshift bench` leaves the committed <device>.csv alone; --update-results writes it."""
    from actshift.benchmarks import run as run_module

    class Op:
        @staticmethod
        def cases(device, quick):
            x = torch.randn(4, 8)
            yield harness.Case("steer", "add", "rows=4 d=8", torch.float32,
                               {harness.EAGER: lambda: x + 1, harness.COPY: lambda: x.clone(),
                                "actshift-cpu": lambda: x + 1}, bytes_actshift=256, bytes_eager=256, bytes_copy=256)
            yield harness.Case("percentile_scale", "scale", "N=4 D=8", torch.float32,
                               {harness.EAGER: lambda: x * 2, "actshift-cpu": lambda: x * 2},
                               bytes_actshift=256, bytes_eager=512)

    monkeypatch.setattr(run_module, "OPS", {"fake": Op})
    assert run_module.run(["fake"], "cpu", True, str(tmp_path)) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) in (1, 2) and runs[0].startswith("cpu-") and runs[0].endswith(".csv")
    assert not (tmp_path / "cpu.csv").exists()
    assert run_module.run(["fake"], "cpu", True, str(tmp_path), update_results=True) == 0
    rows = list(csv.DictReader(open(tmp_path / "cpu.csv")))
    assert {r["op"] for r in rows} == {"steer", "percentile_scale"}
