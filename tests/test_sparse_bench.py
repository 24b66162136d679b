"""The end-to-end decode benchmark's cases on a tiny config: providers run, the FATReLU case is
exact (patched logits equal dense ones), the cache stays at the prompt length, ideals are sane."""
import torch
from conftest import assert_close

from actshift.benchmarks import bench_sparse_decode
from actshift.benchmarks.harness import EAGER


def test_decode_cases_on_tiny_config(monkeypatch):
    tiny_cfg = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, prompt=8)
    monkeypatch.setattr(bench_sparse_decode, "config", lambda quick: dict(tiny_cfg))
    cases = list(bench_sparse_decode.cases("cpu", quick=True))
    assert [c.case for c in cases] == ["teal s=0.5", "fatrelu s=0.9"]
    for c in cases:
        assert set(c.providers) == {EAGER, "actshift-cpu"}
        assert 1.0 < c.bytes_eager / c.bytes_actshift < 10.0
        dense, ours = c.providers[EAGER](), c.providers["actshift-cpu"]()
        assert dense.shape == ours.shape == (1, 1, bench_sparse_decode.VOCAB)
        assert torch.equal(c.providers[EAGER](), dense)  # the cache was cropped: same step again
        if c.case.startswith("fatrelu"):
            assert_close(ours, dense, torch.float32)
        assert "sparsity" in c.note
