"""float64 NumPy ground truth for subpixel_conv2d: the reference conv2d, then the
pixel shuffle as a reshape/transpose (torch's channel order c*r*r + i*r + j)."""

from __future__ import annotations

import numpy as np

from .conv2d import conv2d, conv2d_backward


def _shuffle(y, r):
    b, c, h, w = y.shape
    return y.reshape(b, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


def _unshuffle(y, r):
    b, c, h, w = y.shape
    return y.reshape(b, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


def subpixel_conv2d(x, w, b=None, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1):
    return _shuffle(conv2d(x, w, b, stride, padding, dilation, groups), upscale_factor)


def subpixel_conv2d_backward(gy, x, w, b=None, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1):
    return conv2d_backward(_unshuffle(np.asarray(gy, np.float64), upscale_factor), x, w, b,
                           stride, padding, dilation, groups)
