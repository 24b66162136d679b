"""Sparse activations: TEAL/CATS threshold calibration, module swaps, relufication, reports."""
from .calibrate import Histogram, SparsityTable, calibrate, realized_sparsity, simulate
from .sites import TEAL_SITES
from .thresholds import Thresholds

__all__ = ["calibrate", "realized_sparsity", "simulate", "Thresholds", "Histogram", "SparsityTable", "TEAL_SITES"]
