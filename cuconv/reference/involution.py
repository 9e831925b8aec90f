"""float64 NumPy ground truth for involution2d, forward and backward. Written to be
read: pad the input with zeros, then one strided window per kernel tap (i, j), each
group's kernel repeated over its channels. Shapes and parameter rules follow
cuconv.ops.involution; the arithmetic here shares nothing with the kernels."""

from __future__ import annotations

import numpy as np

from ..ops._common import int_pair
from ..ops.conv2d import conv_output_size


def _setup(x, kernel, stride, padding, dilation):
    """(zero-padded x, the kernel per channel [B, C, kh, kw, Ho, Wo], window slicer)."""
    op = "reference.involution2d"
    (sh, sw), (ph, pw), (dh, dw) = (int_pair(op, "stride", stride, 1), int_pair(op, "padding", padding, 0),
                                    int_pair(op, "dilation", dilation, 1))
    batch, channels, h, w = x.shape
    _, groups, kh, kw, out_h, out_w = kernel.shape
    assert (out_h, out_w) == (conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))
    assert kernel.shape[0] == batch and channels % groups == 0
    # Enough zeros below/right that every window slice is in bounds.
    bottom = max(0, (out_h - 1) * sh + (kh - 1) * dh + 1 - h - ph)
    right = max(0, (out_w - 1) * sw + (kw - 1) * dw + 1 - w - pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, bottom), (pw, right)))
    per_channel = np.repeat(kernel, channels // groups, axis=1)  # channel c gets group c // (C/G)

    def window(i, j):
        """The padded-input slice tap (i, j) reads for every output pixel."""
        return (slice(None), slice(None), slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh),
                slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw))

    return xp, per_channel, window, (ph, pw)


def involution2d(x, kernel, stride=1, padding=0, dilation=1):
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    xp, k, window, _ = _setup(x, kernel, stride, padding, dilation)
    y = np.zeros(x.shape[:2] + kernel.shape[4:])
    for i in range(kernel.shape[2]):
        for j in range(kernel.shape[3]):
            y += k[:, :, i, j] * xp[window(i, j)]
    return y


def involution2d_backward(gy, x, kernel, stride=1, padding=0, dilation=1):
    """(grad_x, grad_kernel) of sum(gy * involution2d(x, kernel))."""
    gy = np.asarray(gy, np.float64)
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    xp, k, window, (ph, pw) = _setup(x, kernel, stride, padding, dilation)
    batch, channels, h, w = x.shape
    groups = kernel.shape[1]
    gxp = np.zeros_like(xp)
    gk = np.zeros_like(kernel)
    for i in range(kernel.shape[2]):
        for j in range(kernel.shape[3]):
            gxp[window(i, j)] += k[:, :, i, j] * gy
            per_channel = gy * xp[window(i, j)]  # [B, C, Ho, Wo]
            gk[:, :, i, j] = per_channel.reshape(batch, groups, channels // groups, *gy.shape[2:]).sum(axis=2)
    return gxp[:, :, ph : ph + h, pw : pw + w], gk
