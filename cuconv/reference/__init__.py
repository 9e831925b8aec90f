"""float64 NumPy ground truth for every op, forward and backward (clarity over speed)."""

from .conv2d import conv2d, conv2d_backward

__all__ = ["conv2d", "conv2d_backward"]
