"""Sparse activations: TEAL/CATS threshold calibration, module swaps, relufication, reports.

    from actshift import sparse
    thr = sparse.calibrate(model, batches, 0.5)            # TEAL: |x| quantiles per (layer, site)
    sparse.realized_sparsity(model, thr, held_out)         # printable table
    undo = sparse.patch_sparsity(model, thr)               # SparseLinear swaps (decode is sparse)
    sparse.unpatch(model)                                  # the original modules back
    sparse.patch_ffn(relu_model, "relu_sparse")            # exact ReLU-sparse FFNs
"""
from .calibrate import Histogram, SparsityTable, calibrate, realized_sparsity, simulate
from .cats import CatsMLP
from .ffn import ReluFFN, ReluGatedMLP
from .linear import DECODE_MAX_ROWS, Counters, SparseLinear, is_decode
from .patch import counters, patch_ffn, patch_sparsity, unpatch
from .relufy import FATReLU, calibrate_fatrelu, relufy, sparsity_report
from .sites import TEAL_SITES
from .thresholds import Thresholds

__all__ = [
    "calibrate",
    "realized_sparsity",
    "simulate",
    "Thresholds",
    "Histogram",
    "SparsityTable",
    "TEAL_SITES",
    "patch_sparsity",
    "patch_ffn",
    "unpatch",
    "counters",
    "Counters",
    "SparseLinear",
    "CatsMLP",
    "ReluGatedMLP",
    "ReluFFN",
    "DECODE_MAX_ROWS",
    "is_decode",
    "relufy",
    "calibrate_fatrelu",
    "FATReLU",
    "sparsity_report",
]
