"""One module per op family: validate -> plan -> launch, forward and backward."""

from . import conv2d_igemm  # noqa: F401  (registers conv2d_igemm.cu: algorithm="implicit_gemm")
from . import depthwise  # noqa: F401  (registers depthwise.cu: algorithm="depthwise")
from . import depthwise_tc  # noqa: F401  (registers depthwise_tc.cu: algorithm="implicit_gemm", depthwise)
from .conv2d import conv2d, conv2d_backward, conv_output_size
from .conv_transpose2d import conv_transpose2d, conv_transpose2d_backward
from .deform_conv import deform_conv2d, deform_conv2d_backward
from .dynamic_conv import (dynamic_conv2d, dynamic_conv2d_backward, odconv2d, odconv2d_backward, warehouse_conv2d, warehouse_conv2d_backward)
from .involution import involution2d, involution2d_backward
from .pixel_shuffle import pixel_shuffle, pixel_shuffle_backward, pixel_unshuffle, pixel_unshuffle_backward
from .separable import (depthwise_separable_conv2d, depthwise_separable_conv2d_backward, spatial_separable_conv2d,
                        spatial_separable_conv2d_backward)
from .spectral import spectral_filter2d, spectral_filter2d_backward
from .subpixel import subpixel_conv2d, subpixel_conv2d_backward

__all__ = ["conv2d", "conv2d_backward", "conv_output_size", "conv_transpose2d", "conv_transpose2d_backward",
           "deform_conv2d", "deform_conv2d_backward", "dynamic_conv2d", "dynamic_conv2d_backward", "odconv2d",
           "odconv2d_backward", "warehouse_conv2d", "warehouse_conv2d_backward",
           "depthwise_separable_conv2d", "depthwise_separable_conv2d_backward", "involution2d", "involution2d_backward",
           "pixel_shuffle", "pixel_shuffle_backward", "pixel_unshuffle", "pixel_unshuffle_backward",
           "spatial_separable_conv2d", "spatial_separable_conv2d_backward", "spectral_filter2d",
           "spectral_filter2d_backward",
           "subpixel_conv2d", "subpixel_conv2d_backward"]
