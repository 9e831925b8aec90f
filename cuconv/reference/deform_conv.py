"""float64 NumPy ground truth for deform_conv2d (torchvision semantics), forward and
all five gradients. Written to be read: one explicit bilinear sampling per (tap, offset
group), vectorised over batch, channels and pixels; the arithmetic shares nothing with
the kernels. Shape checking reuses cuconv.ops.deform_conv's validation.

Rules (see docs/deform_conv2d.md):
  position  Y = oy*sh - ph + i*dh + dy,  X = ox*sw - pw + j*dw + dx
  sample    0 unless -1 < Y < H and -1 < X < W, else bilinear with corners outside = 0
  dS/dY, dS/dX: torchvision's coordinate weights, the derivative of the floor-based
            bilinear formula WITHOUT the -1 < Y < H gate (non-zero at Y = -1 exactly).
"""

from __future__ import annotations

import numpy as np

from ..ops._common import Call
from ..ops.deform_conv import DeformGeometry


def _geometry(op, x, offset, weight, bias, mask, stride, padding, dilation):
    call = Call(op, input=x, offset=offset, weight=weight, bias=bias, mask=mask, optional=("bias", "mask"))
    return DeformGeometry(op, call, stride, padding, dilation)


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _positions(geom, offset, g, i, j):
    """(Y, X) [B, Ho, Wo] of tap (i, j) for offset group g."""
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.pad, geom.dilation
    t = i * geom.kernel_w + j
    base = g * 2 * geom.taps
    oy = np.arange(geom.out_h)[:, None] * sh - ph + i * dh
    ox = np.arange(geom.out_w)[None, :] * sw - pw + j * dw
    return oy + offset[:, base + 2 * t], ox + offset[:, base + 2 * t + 1]


def _corner(x, rows, cols):
    """x[b, c, rows[b, p], cols[b, p]] with 0 where (rows, cols) is outside the image:
    x [B, C, H, W], rows/cols integer [B, Ho, Wo] -> [B, C, Ho, Wo]."""
    _, _, h, w = x.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    r, c = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    batch = np.arange(x.shape[0])[:, None, None]
    values = x[batch, :, r, c]  # [B, Ho, Wo, C]
    return np.moveaxis(np.where(inside[..., None], values, 0.0), -1, 1)


def _floor_parts(y, x):
    yl, xl = np.floor(y), np.floor(x)
    return yl.astype(np.int64), xl.astype(np.int64), y - yl, x - xl


def bilinear(x, y, xs):
    """S(x, Y, X): [B, C, Ho, Wo] samples of x [B, C, H, W] at Y, X [B, Ho, Wo]."""
    _, _, h, w = x.shape
    gate = ((y > -1) & (y < h) & (xs > -1) & (xs < w))[:, None]
    y = np.where(gate[:, 0], y, 0.0)  # keep floor() finite where the gate is off
    xs = np.where(gate[:, 0], xs, 0.0)
    yl, xl, ly, lx = _floor_parts(y, xs)
    ly, lx = ly[:, None], lx[:, None]
    value = ((1 - ly) * (1 - lx) * _corner(x, yl, xl) + (1 - ly) * lx * _corner(x, yl, xl + 1)
             + ly * (1 - lx) * _corner(x, yl + 1, xl) + ly * lx * _corner(x, yl + 1, xl + 1))
    return np.where(gate, value, 0.0)


def bilinear_coordinate_gradients(x, y, xs):
    """(dS/dY, dS/dX) [B, C, Ho, Wo], torchvision's (ungated) coordinate weights."""
    _, _, h, w = x.shape
    near = (y > -2) & (y < h + 1) & (xs > -2) & (xs < w + 1)  # elsewhere no corner is inside
    y = np.where(near, y, -5.0)
    xs = np.where(near, xs, -5.0)
    yl, xl, ly, lx = _floor_parts(y, xs)
    ly, lx = ly[:, None], lx[:, None]
    v00, v01 = _corner(x, yl, xl), _corner(x, yl, xl + 1)
    v10, v11 = _corner(x, yl + 1, xl), _corner(x, yl + 1, xl + 1)
    d_y = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
    d_x = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
    return d_y, d_x


def _scatter_bilinear(grad_x, values, y, xs):
    """grad_x [B, C, H, W] += the adjoint of bilinear(): values [B, C, Ho, Wo] spread to
    the corners of (Y, X) with the same gate and weights."""
    b_count, c_count, h, w = grad_x.shape
    gate = (y > -1) & (y < h) & (xs > -1) & (xs < w)
    y = np.where(gate, y, 0.0)
    xs = np.where(gate, xs, 0.0)
    yl, xl, ly, lx = _floor_parts(y, xs)
    batch = np.broadcast_to(np.arange(b_count)[:, None, None, None], values.shape)
    chan = np.broadcast_to(np.arange(c_count)[None, :, None, None], values.shape)
    for dy, dx, weight in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)),
                           (1, 1, ly * lx)):
        rows, cols = yl + dy, xl + dx
        keep = gate & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        contribution = values * np.where(keep, weight, 0.0)[:, None]
        r = np.broadcast_to(np.clip(rows, 0, h - 1)[:, None], values.shape)
        c = np.broadcast_to(np.clip(cols, 0, w - 1)[:, None], values.shape)
        np.add.at(grad_x, (batch, chan, r, c), contribution)


def _taps(geom):
    for g in range(geom.offset_groups):
        for i in range(geom.kernel_h):
            for j in range(geom.kernel_w):
                yield g, i, j, i * geom.kernel_w + j


def _columns(geom, x, offset, mask):
    """The (never materialised by the kernels) modulated samples cols [B, Cin, K, Ho, Wo]
    and the raw samples S of the same shape."""
    cpo = geom.in_channels // geom.offset_groups
    samples = np.zeros((geom.batch, geom.in_channels, geom.taps, geom.out_h, geom.out_w))
    modulation = np.ones_like(samples)
    for g, i, j, t in _taps(geom):
        channels = slice(g * cpo, (g + 1) * cpo)
        y, xs = _positions(geom, offset, g, i, j)
        samples[:, channels, t] = bilinear(x[:, channels], y, xs)
        if mask is not None:
            modulation[:, channels, t] = mask[:, g * geom.taps + t][:, None]
    return samples * modulation, samples, modulation


def _group_slices(geom):
    cin_g, cout_g = geom.in_channels // geom.weight_groups, geom.out_channels // geom.weight_groups
    for gw in range(geom.weight_groups):
        yield slice(gw * cin_g, (gw + 1) * cin_g), slice(gw * cout_g, (gw + 1) * cout_g)


def deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    x, offset, weight, bias, mask = map(_f64, (x, offset, weight, bias, mask))
    geom = _geometry("reference.deform_conv2d", x, offset, weight, bias, mask, stride, padding, dilation)
    cols, _, _ = _columns(geom, x, offset, mask)
    w = weight.reshape(geom.out_channels, -1, geom.taps)
    y = np.zeros(geom.output_shape)
    for cin, cout in _group_slices(geom):
        y[:, cout] = np.einsum("bckhw,ock->bohw", cols[:, cin], w[cout])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def deform_conv2d_backward(gy, x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """(grad_input, grad_offset, grad_weight, grad_bias, grad_mask) of sum(gy * deform_conv2d(...));
    grad_bias / grad_mask are None without bias / mask."""
    gy, x, offset, weight, bias, mask = map(_f64, (gy, x, offset, weight, bias, mask))
    geom = _geometry("reference.deform_conv2d_backward", x, offset, weight, bias, mask, stride, padding, dilation)
    cols, samples, modulation = _columns(geom, x, offset, mask)
    w = weight.reshape(geom.out_channels, -1, geom.taps)
    gcol = np.zeros_like(cols)  # dL/dcols[b, c, t, p] = sum_o w[o, c, t] gy[b, o, p]
    grad_w = np.zeros_like(w)
    for cin, cout in _group_slices(geom):
        gcol[:, cin] = np.einsum("ock,bohw->bckhw", w[cout], gy[:, cout])
        grad_w[cout] = np.einsum("bohw,bckhw->ock", gy[:, cout], cols[:, cin])
    grad_bias = None if bias is None else gy.sum(axis=(0, 2, 3))

    cpo = geom.in_channels // geom.offset_groups
    grad_x = np.zeros_like(x)
    grad_offset = np.zeros_like(offset)
    grad_mask = None if mask is None else np.zeros_like(mask)
    for g, i, j, t in _taps(geom):
        channels = slice(g * cpo, (g + 1) * cpo)
        y, xs = _positions(geom, offset, g, i, j)
        m = modulation[:, channels, t]  # [B, Cpo, Ho, Wo], equal over channels
        d_y, d_x = bilinear_coordinate_gradients(x[:, channels], y, xs)
        grad_offset[:, g * 2 * geom.taps + 2 * t] = np.sum(gcol[:, channels, t] * m * d_y, axis=1)
        grad_offset[:, g * 2 * geom.taps + 2 * t + 1] = np.sum(gcol[:, channels, t] * m * d_x, axis=1)
        if mask is not None:
            grad_mask[:, g * geom.taps + t] = np.sum(gcol[:, channels, t] * samples[:, channels, t], axis=1)
        part = np.zeros_like(x[:, channels])
        _scatter_bilinear(part, gcol[:, channels, t] * m, y, xs)
        grad_x[:, channels] += part
    return grad_x, grad_offset, grad_w.reshape(weight.shape), grad_bias, grad_mask
