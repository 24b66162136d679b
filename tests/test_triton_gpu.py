"""What the Triton kernels do on real GPUs that the interpreter cannot show: the code they compile to
for sm_90 (no spills, no approximate division: an ahead-of-time compile, no GPU needed), what
Inductor sees them write (dummy pointers must not look mutated), the device they launch on, and the
accuracy of their exp. Compiling needs TRITON_INTERPRET off, so those checks run in a child process."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import actshift
from actshift.steering import SteeringBank, SteeringPlan

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# Inductor decides what a user Triton kernel mutates from its TTIR (constexprs applied); a masked
# store through a dummy pointer counts as a write of whatever tensor was passed there.
_WRITES_SCRIPT = textwrap.dedent(
    """
    from unittest import mock
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    from actshift.kernels import steer as ks
    from actshift.steering import SteeringBank, SteeringPlan

    class Launch:  # records the arguments the launcher passes to the kernel
        def __getitem__(self, grid):
            def run(*args, **kw):
                self.kwargs = dict(zip([p.name for p in ks._program_kernel.params], args)) | kw
                self.kwargs.pop("num_warps")
            return run

    d = 64
    target = mock.MagicMock()
    target.get_current_target.return_value = GPUTarget("cuda", 90, 32)
    for monitors in (False, True):
        plan = SteeringPlan(add=torch.randn(d)).affine(torch.rand(d))
        plan = plan.monitor(torch.randn(2, d)) if monitors else plan
        launch = Launch()
        with mock.patch.object(ks, "wrap_triton", lambda kernel: launch):
            ks.steer_program(torch.randn(3, d), *SteeringBank([plan]).program(torch.device("cpu")))
        with mock.patch.object(triton.runtime.driver, "_active", target, create=True):
            writes = identify_accessed_tensors(ks._program_kernel, launch.kwargs, {}).read_writes.writes
        print(monitors, sorted(dep.name for dep in writes))
    """
)


def test_program_kernel_writes_only_its_outputs():
    """Without monitors the program kernel has no store through its dummy monitor pointer, so under
    torch.compile no input (e.g. the bank's scalars) is treated as mutated."""
    done = _child(_WRITES_SCRIPT)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2:] == ["False ['y_ptr']", "True ['mon_ptr', 'y_ptr']"], done.stdout


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_without_new_spills_or_approximate_division():
    """scripts/triton_aot_check.py: each variant the launchers pick, per dtype, for sm_90."""
    pytest.importorskip("triton.backends.nvidia")
    done = _child("", str(ROOT / "scripts" / "triton_aot_check.py"), timeout=3000)
    assert done.returncode == 0 and "no spills beyond KNOWN_SPILLS, no approximate division" in done.stdout, (
        done.stdout[-4000:] + done.stderr[-4000:])


# --- on a GPU -------------------------------------------------------------------------------------


def _every_triton_op(device: str):
    """(name, call) pairs running each Triton op once on `device`, with the reference result."""
    d = 64
    x = torch.randn(4, d, device=device)
    plan = SteeringPlan(add=torch.randn(d)).ablate(torch.nn.functional.normalize(torch.randn(d), dim=0))
    add_only = SteeringPlan(add=torch.randn(d))
    w = torch.randn(96, d, device=device) / 8
    yield ("steer", lambda: actshift.steer(x, add_only, backend="triton"),
           actshift.steer(x, add_only, backend="reference"))
    yield ("steer_program", lambda: actshift.steer(x, plan, backend="triton"),
           actshift.steer(x, plan, backend="reference"))
    yield ("percentile_scale", lambda: actshift.percentile_scale(x, 80.0, "scale", backend="triton"),
           actshift.percentile_scale(x, 80.0, "scale", backend="reference"))
    yield ("sparse_threshold", lambda: actshift.sparse_threshold(x, 0.5, backend="triton"),
           actshift.sparse_threshold(x, 0.5, backend="reference"))
    w_t = w.t().contiguous()
    yield ("sparse_linear", lambda: actshift.sparse_linear(x, w_t, 0.5, backend="triton"),
           actshift.sparse_linear(x, w_t, 0.5, backend="reference"))
    yield ("relu_ffn", lambda: actshift.relu_ffn(x, w, w.flip(0), w, "relu", backend="triton"),
           actshift.relu_ffn(x, w, w.flip(0), w, "relu", backend="reference"))


@pytest.mark.cuda
def test_triton_ops_launch_on_the_tensors_device():
    """A tensor on cuda:1 while cuda:0 is current: each op launches on cuda:1 (and its stream)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    for name, call, expected in _every_triton_op("cuda:1"):
        got = call()
        assert got.device == torch.device("cuda:1"), name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.cuda
def test_exp_is_the_cuda_math_library_expf():
    """kernels/_math.exp is libdevice's expf: within 2 ulp of the exact value over the range the
    percentile ratio r takes, unlike tl.exp's ex2.approx(x·log2 e)."""
    import triton
    import triton.language as tl

    from actshift.kernels._math import exp

    @triton.jit
    def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, exp(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

    x = torch.linspace(-87.0, 88.0, 1 << 20, device="cuda")
    y = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.exp(x.double())
    ulp = (exact.float().nextafter(torch.tensor(float("inf"), device="cuda")) - exact.float()).double()
    assert float(((y.double() - exact).abs() / ulp).max()) <= 2.0
