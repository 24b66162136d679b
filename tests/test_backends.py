"""Backend selection, availability errors, the build record check, and `actshift info`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_backend

import actshift
from actshift import _ext, backends


def test_auto_picks_cpu_kernel_on_cpu():
    require_backend("cpu", "cpu")
    assert backends.resolve("auto", torch.device("cpu")) == "cpu"


def test_override_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ACTSHIFT_BACKEND", "reference")
    actshift.set_backend(None)  # re-reads the environment (as importing actshift does)
    assert backends.resolve("auto", cpu) == "reference"
    actshift.set_backend("cpu")  # set_backend beats the environment
    assert backends.resolve("auto", cpu) == "cpu"
    assert backends.resolve("reference", cpu) == "reference"  # the argument beats both
    monkeypatch.setenv("ACTSHIFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ACTSHIFT_BACKEND"):
        actshift.set_backend(None)
    monkeypatch.delenv("ACTSHIFT_BACKEND")
    actshift.set_backend(None)
    assert backends.resolve("auto", cpu) == "cpu"


def test_environment_variable_is_read_at_import():
    env = dict(os.environ, ACTSHIFT_BACKEND="reference")
    code = "import torch, actshift; from actshift import backends; print(backends.resolve('auto', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend"):
        actshift.steer(torch.randn(2, 4), actshift.SteeringPlan(add=torch.randn(4)), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        actshift.set_backend("gpu")


def test_explicit_unavailable_backend_raises_no_fallback():
    x, plan = torch.randn(2, 4), actshift.SteeringPlan(add=torch.randn(4))
    with pytest.raises(actshift.BackendUnavailableError, match="cuda"):
        actshift.steer(x, plan, backend="cuda")  # a CPU tensor never runs on the cuda backend
    actshift.set_backend("cuda")
    with pytest.raises(actshift.BackendUnavailableError, match="cuda"):
        actshift.steer(x, plan)


def test_mismatched_build_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    record = dict(_ext.build_info(), torch="1.0.0")
    (tmp_path / "_build_info.json").write_text(json.dumps(record))
    monkeypatch.setattr(_ext, "_HERE", str(tmp_path))
    ok, reason = _ext._load()
    assert not ok
    assert "built for torch 1.0.0" in reason and torch.__version__ in reason and "rebuild" in reason


def test_missing_build_record(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "_HERE", str(tmp_path))
    ok, reason = _ext._load()
    assert not ok and "rebuild" in reason


def test_info_function_and_cli():
    d = actshift.info()
    assert d["torch"] == torch.__version__
    assert set(d["backends"]) == set(backends.BACKENDS)
    assert d["backends"]["reference"] == "available"
    out = subprocess.run([sys.executable, "-m", "actshift.cli", "info"], capture_output=True, text=True, check=True).stdout
    assert "torch: " + torch.__version__ in out and "backends:" in out and "cuda:" in out
