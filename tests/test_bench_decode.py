"""The decode benchmark compares equal work: hook steering and patched steering generate the same
tokens, the unsteered provider does not steer, and every provider leaves the model as it found it."""
import pytest

from actshift.benchmarks import bench_decode
from actshift.benchmarks.harness import EAGER, Result

pytest.importorskip("transformers")


def test_providers_do_equal_work_and_clean_up():
    case = next(bench_decode.cases("cpu", quick=True))
    providers = case.providers
    assert set(providers) == {bench_decode.UNSTEERED, EAGER, bench_decode.PATCHED} and case.peer == bench_decode.UNSTEERED
    plain = providers[bench_decode.UNSTEERED]()
    hooked = providers[EAGER]()
    patched = providers[bench_decode.PATCHED]()
    assert hooked.shape == plain.shape and hooked.shape[1] == 8 + 8
    assert (hooked == patched).all() and not (hooked == plain).all()
    assert (providers[bench_decode.UNSTEERED]() == plain).all()  # no hook or patch left behind


def test_summary_reports_tokens_per_second_and_ratios():
    case = next(bench_decode.cases("cpu", quick=True))
    results = [Result(case, bench_decode.UNSTEERED, 1e6, 0, 0), Result(case, EAGER, 1.2e6, 0, 0),
               Result(case, bench_decode.PATCHED, 1.05e6, 0, 0)]
    text = bench_decode.summary(results)
    assert "unsteered 8.0 tok/s" in text and "actshift-patch 7.6 tok/s" in text
    assert "+5.0% time" in text and "x1.143" in text
