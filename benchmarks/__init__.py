"""The benchmark suite behind `actshift bench` (installed as actshift.benchmarks)."""
