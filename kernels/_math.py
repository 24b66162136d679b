"""Elementwise math the Triton kernels share, chosen so that backends agree (README, "Accuracy").

`tl.exp` lowers to ex2.approx(x·log2 e), whose error grows with |x| (tens of ulp near e^88), and
`/` to div.full.f32 (2 ulp). Where results must match the C++/CUDA kernels, the kernels divide with
tl.div_rn (IEEE, correctly rounded, as CUDA's `/` without fast math and the CPU) and take exp from
libdevice, the CUDA math library's expf that csrc/cuda calls (so Triton and CUDA agree to the bit).
The interpreter has no libdevice; there tl.exp is numpy's fp32 exp, which is accurate.
"""
import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET", "0") == "1":

    @triton.jit
    def exp(x):
        return tl.exp(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp(x):
        return libdevice.exp(x)
