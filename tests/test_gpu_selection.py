"""The test selection on a GPU machine, simulated on CPU: there TRITON_INTERPRET stays off, so Triton
cannot run CPU tensors, and every cpu x triton case must skip (not fail), while the same cases
run here under the interpreter. A child pytest sees torch.cuda.is_available() patched to True."""
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

# One of each kind the issue lists: device_backend_params() cases, test_steer_program_gpu's PARAMS,
# a hypothesis case, test_sparse_triton's fixture, and a Triton opcheck test.
SELECTION = [
    "test_steer.py::test_matches_reference",
    "test_steer_program_gpu.py::test_opcheck",
    "test_steer_program.py::test_property_against_reference",
    "test_sparse_triton.py::test_opcheck_triton_ops",
    "test_percentile.py::test_opcheck_triton_ops",
]

_CHILD = """
import sys, torch
torch.cuda.is_available = lambda: True  # before conftest and actshift read it
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def _run(ids: list[str], *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _CHILD, "-q", "-p", "no:cacheprovider", "-rs", *extra, *ids],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    return done.stdout + done.stderr


def test_cpu_triton_cases_skip_on_a_gpu_machine():
    ids = [f"{t}" for t in SELECTION]
    out = _run(ids, "-k", "triton and not cuda")
    summary = out.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, out[-4000:]
    assert "passed" not in summary, f"a cpu x triton case ran without the interpreter: {summary}"
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert skipped >= len(SELECTION), out[-4000:]
    assert "TRITON_INTERPRET=1, which stays off on a GPU machine" in out
