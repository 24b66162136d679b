"""The decode benchmark's sanity check: steering cannot make decoding faster than not steering, so
a patched median below the unsteered p20 is reported as implausible, never as a ratio."""
import torch

from actshift.benchmarks import bench_decode as bd
from actshift.benchmarks import harness


def _results(patched_median: float):
    case = harness.Case("decode", "steer small", "L=8 d=128 batch=1 test", torch.float32, {}, 1, 1,
                        note="48 new tokens", peer=bd.UNSTEERED)
    bd._TOKENS[case.shape] = 48
    return [harness.Result(case, bd.UNSTEERED, 100_000.0, 98_000.0, 103_000.0),
            harness.Result(case, harness.EAGER, 104_000.0, 102_000.0, 106_000.0),
            harness.Result(case, bd.PATCHED, patched_median, patched_median - 1000, patched_median + 1000)]


def test_patched_faster_than_unsteered_beyond_the_spread_is_flagged():
    results = _results(90_000.0)
    text = bd.summary(results)
    assert "IMPLAUSIBLE" in text and "% time" not in text
    assert "IMPLAUSIBLE" in results[0].case.note  # and the CSV row says so


def test_plausible_result_reports_ms_per_token_and_ratios():
    text = bd.summary(_results(101_000.0))
    assert "IMPLAUSIBLE" not in text
    assert "patched vs unsteered +1.0% time" in text and "hooks vs patched x1.030" in text
    assert f"unsteered {100_000.0 / 48 / 1000:.3f} ms/token" in text
