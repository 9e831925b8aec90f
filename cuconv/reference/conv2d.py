"""float64 NumPy ground truth for conv2d, forward and backward. Written to be read:
one einsum per (group, kernel tap), no cleverness. Shapes and parameter rules come
from cuconv.ops.conv2d.conv_geometry; the arithmetic here shares nothing with the
kernels."""

from __future__ import annotations

import numpy as np

from ..ops.conv2d import conv_geometry


def _windows(geom):
    """For each group g and tap (ky, kx): the input channel range, output channel range,
    and the strided row/column slices of the padded input that the tap reads."""
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    for g in range(geom.groups):
        cin = slice(g * cin_g, (g + 1) * cin_g)
        cout = slice(g * cout_g, (g + 1) * cout_g)
        for ky in range(geom.kernel_h):
            for kx in range(geom.kernel_w):
                rows = slice(ky * dh, ky * dh + sh * (geom.out_h - 1) + 1, sh)
                cols = slice(kx * dw, kx * dw + sw * (geom.out_w - 1) + 1, sw)
                yield cin, cout, ky, kx, rows, cols


def _padding(geom):
    """(top, bottom), (left, right): enough zeros that every window is in bounds."""
    (sh, sw), (dh, dw), (ph, pw) = geom.stride, geom.dilation, geom.pad
    need_h = (geom.out_h - 1) * sh + dh * (geom.kernel_h - 1) + 1
    need_w = (geom.out_w - 1) * sw + dw * (geom.kernel_w - 1) + 1
    return (ph, max(0, need_h - geom.in_h - ph)), (pw, max(0, need_w - geom.in_w - pw))


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    geom = conv_geometry("reference.conv2d", x.shape, w.shape, None if b is None else np.shape(b),
                         stride, padding, dilation, groups)
    pad_h, pad_w = _padding(geom)
    xp = np.pad(x, ((0, 0), (0, 0), pad_h, pad_w))
    y = np.zeros(geom.output_shape)
    for cin, cout, ky, kx, rows, cols in _windows(geom):
        y[:, cout] += np.einsum("bchw,oc->bohw", xp[:, cin, rows, cols], w[cout, :, ky, kx])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_backward(gy, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """(grad_x, grad_w, grad_b) of sum(gy * conv2d(x, w, b)); grad_b is None without b."""
    gy = np.asarray(gy, np.float64)
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    geom = conv_geometry("reference.conv2d_backward", x.shape, w.shape, None if b is None else np.shape(b),
                         stride, padding, dilation, groups)
    pad_h, pad_w = _padding(geom)
    xp = np.pad(x, ((0, 0), (0, 0), pad_h, pad_w))
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for cin, cout, ky, kx, rows, cols in _windows(geom):
        gxp[:, cin, rows, cols] += np.einsum("bohw,oc->bchw", gy[:, cout], w[cout, :, ky, kx])
        gw[cout, :, ky, kx] = np.einsum("bohw,bchw->oc", gy[:, cout], xp[:, cin, rows, cols])
    gx = gxp[:, :, pad_h[0] : pad_h[0] + geom.in_h, pad_w[0] : pad_w[0] + geom.in_w]
    gb = None if b is None else gy.sum(axis=(0, 2, 3))
    return gx, gw, gb
