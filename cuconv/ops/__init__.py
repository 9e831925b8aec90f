"""One module per op family: validate -> plan -> launch, forward and backward."""

from .conv2d import conv2d, conv2d_backward, conv_output_size

__all__ = ["conv2d", "conv2d_backward", "conv_output_size"]
