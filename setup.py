"""Build script: the C++ CPU extension always, plus CUDA sources when torch has CUDA and nvcc exists.

Environment switches:
  ACTSHIFT_NO_EXT=1    pure-Python install (reference + Triton backends only)
  ACTSHIFT_NO_CUDA=1   build the CPU extension only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST CUDA architectures (torch's own variable, e.g. "8.0;9.0")
  MAX_JOBS             parallel compile jobs (torch's own variable, used by ninja)
  ACTSHIFT_DEBUG=1     -O0 -g
The versions the extension was built against are written to actshift/_build_info.json; at import,
actshift compares them with the running torch and refuses to load a mismatched binary.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = {
    "actshift": "python/actshift",
    "actshift.kernels": "kernels",
    "actshift.benchmarks": "benchmarks",
}
PACKAGES = [
    "actshift",
    "actshift.kernels",
    "actshift.benchmarks",
    "actshift.ops",
    "actshift.steering",
    "actshift.ood",
    # sparse activations (issues 5, 6)
    "actshift.sparse",
    "actshift.integrations",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else "unknown"


def extensions_and_info():
    info = {"cpu": False, "cuda": False, "cpu_reason": "", "cuda_reason": ""}
    if _flag("ACTSHIFT_NO_EXT"):
        info["cpu_reason"] = info["cuda_reason"] = "ACTSHIFT_NO_EXT=1 at build time"
        return [], {}, info

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    debug = _flag("ACTSHIFT_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/*_checks.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc/include")]

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if _flag("ACTSHIFT_NO_CUDA"):
        info["cuda_reason"] = "ACTSHIFT_NO_CUDA=1 at build time"
    elif not torch.version.cuda:
        info["cuda_reason"] = f"torch {torch.__version__} has no CUDA"
    elif not nvcc or not os.path.exists(nvcc):
        info["cuda_reason"] = "nvcc not found (set CUDA_HOME)"
    else:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/torch_bindings_cuda.cpp"]
        info.update(cuda=True, nvcc=_nvcc_version(nvcc), arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs"))
        ext = CUDAExtension(
            "actshift._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("ACTSHIFT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
        info["cpu"] = True
        return [ext], {"build_ext": BuildExtension}, info

    ext = CppExtension("actshift._C", sources, include_dirs=include_dirs, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    info["cpu"] = True
    return [ext], {"build_ext": BuildExtension}, info


ext_modules, cmdclass, build_info = extensions_and_info()
with open(os.path.join(ROOT, "python/actshift/_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1, sort_keys=True)

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"actshift": ["py.typed", "_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
