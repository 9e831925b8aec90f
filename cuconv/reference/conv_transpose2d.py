"""float64 NumPy ground truth for conv_transpose2d, from its scatter definition: every
input pixel adds weight x value to the output pixels its kernel taps reach
(y[b, o, iy*s - p + ky*d, ix*s - p + kx*d] += x[b, i, iy, ix] * w[i, o, ky, kx]).
Independent of the conv2d reference and of the kernels' gather formulation."""

from __future__ import annotations

import numpy as np

from ..ops.conv_transpose2d import transposed_geometry


def _taps(x_shape, w_shape, geom):
    """For each group and tap: input channels, output channels, and the strided slices of
    the uncropped output that the tap writes (one per input pixel)."""
    cin_g = x_shape[1] // geom.groups
    cout_g = w_shape[1]
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    for g in range(geom.groups):
        cin, cout = slice(g * cin_g, (g + 1) * cin_g), slice(g * cout_g, (g + 1) * cout_g)
        for ky in range(w_shape[2]):
            for kx in range(w_shape[3]):
                rows = slice(ky * dh, ky * dh + sh * (x_shape[2] - 1) + 1, sh)
                cols = slice(kx * dw, kx * dw + sw * (x_shape[3] - 1) + 1, sw)
                yield cin, cout, ky, kx, rows, cols


def _uncropped_shape(x_shape, w_shape, geom):
    """The scatter's full extent, with room for output_padding past it."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    h = (x_shape[2] - 1) * sh + dh * (w_shape[2] - 1) + 1
    w = (x_shape[3] - 1) * sw + dw * (w_shape[3] - 1) + 1
    return (x_shape[0], w_shape[1] * geom.groups, h + sh + dh, w + sw + dw)


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    geom = transposed_geometry("reference.conv_transpose2d", x.shape, w.shape,
                               None if b is None else np.shape(b), stride, padding, output_padding, groups, dilation)
    full = np.zeros(_uncropped_shape(x.shape, w.shape, geom))
    for cin, cout, ky, kx, rows, cols in _taps(x.shape, w.shape, geom):
        full[:, cout, rows, cols] += np.einsum("bihw,io->bohw", x[:, cin], w[cin, :, ky, kx])
    (ph, pw), out_h, out_w = geom.pad, geom.in_h, geom.in_w
    y = full[:, :, ph : ph + out_h, pw : pw + out_w].copy()
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv_transpose2d_backward(gy, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """(grad_x, grad_w, grad_b) of sum(gy * conv_transpose2d(x, w, b)): each tap reads back
    the output pixels it wrote."""
    gy = np.asarray(gy, np.float64)
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    geom = transposed_geometry("reference.conv_transpose2d_backward", x.shape, w.shape,
                               None if b is None else np.shape(b), stride, padding, output_padding, groups, dilation)
    (ph, pw), out_h, out_w = geom.pad, geom.in_h, geom.in_w
    gfull = np.zeros(_uncropped_shape(x.shape, w.shape, geom))
    gfull[:, :, ph : ph + out_h, pw : pw + out_w] = gy
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for cin, cout, ky, kx, rows, cols in _taps(x.shape, w.shape, geom):
        gx[:, cin] += np.einsum("bohw,io->bihw", gfull[:, cout, rows, cols], w[cin, :, ky, kx])
        gw[cin, :, ky, kx] = np.einsum("bihw,bohw->io", x[:, cin], gfull[:, cout, rows, cols])
    gb = None if b is None else gy.sum(axis=(0, 2, 3))
    return gx, gw, gb
