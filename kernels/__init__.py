"""Triton kernels of actshift (installed as the sub-package `actshift.kernels`)."""
