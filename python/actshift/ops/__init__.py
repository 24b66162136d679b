"""Typed public wrappers of the actshift ops: validation, backend dispatch, shape handling."""
from .adascale import adascale_stats
from .energy import energy
from .percentile import percentile_scale, scale_ratio
from .steer import apply_steer, steer

# sparse ops
from .relu_ffn import cats_mlp, relu_ffn  # noqa: E402
from .sparse_linear import sparse_linear  # noqa: E402
from .sparse_threshold import sparse_threshold  # noqa: E402

from .route import route  # noqa: E402  (MoE router)

__all__ = ["steer", "apply_steer", "percentile_scale", "scale_ratio", "energy", "adascale_stats"]
__all__ += ["sparse_threshold", "sparse_linear", "relu_ffn", "cats_mlp"]  # sparse ops
__all__ += ["route"]  # MoE router
