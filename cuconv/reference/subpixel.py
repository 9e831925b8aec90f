"""float64 NumPy ground truth for subpixel_conv2d: the reference conv2d, then the
reference pixel shuffle (torch's channel order c*r*r + i*r + j)."""

from __future__ import annotations

from .conv2d import conv2d, conv2d_backward
from .pixel_shuffle import pixel_shuffle, pixel_unshuffle


def subpixel_conv2d(x, w, b=None, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1):
    return pixel_shuffle(conv2d(x, w, b, stride, padding, dilation, groups), upscale_factor)


def subpixel_conv2d_backward(gy, x, w, b=None, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1):
    return conv2d_backward(pixel_unshuffle(gy, upscale_factor), x, w, b, stride, padding, dilation, groups)
