"""float64 NumPy ground truth for dcnv3 and dcnv4 (InternImage / FlashInternImage core
ops), forward and backward. Written to be read: explicit loops over the batch, output
pixels, groups and taps, one bilinear sample (vectorised over the group's D channels)
per step. Shares nothing with the kernels but the semantics.

Semantics (kernels_cu/dcn.cu has them in full): channels-last input [N, H, W, C],
C = G*D; tap k = i*kh + j with the x index i outside (remove_center skips the centre);
point px = ow*sw - pw + cx + s*(i*dw - cx + dx), py = oh*sh - ph + cy + s*(j*dh - cy + dy),
cx = (dw*(kw-1))//2, cy = (dh*(kh-1))//2; a tap counts only if -1 < py < H and -1 < px < W,
then it is bilinear over floor/floor+1 with out-of-image corners 0.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, (int, np.integer)) else tuple(v)


def taps(kernel_size, remove_center=False):
    """The (i, j) of each tap in order: i (x index) outside, j (y index) inside."""
    kh, kw = _pair(kernel_size)
    out = [(i, j) for i in range(kw) for j in range(kh)]
    if remove_center:
        out.remove((kw // 2, kh // 2))
    return out


def output_size(h, w, kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def sampling_point(oh, ow, i, j, dx, dy, kernel_size, stride, padding, dilation, offset_scale):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    cx, cy = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    px = ow * sw - pw + cx + offset_scale * (i * dw - cx + dx)
    py = oh * sh - ph + cy + offset_scale * (j * dh - cy + dy)
    return py, px


def _corners(img, py, px):
    """The 4 corner values [D] (0 outside the image) and the fractional parts."""
    h, w = img.shape[:2]
    yl, xl = math.floor(py), math.floor(px)

    def v(u, x):
        return img[u, x] if 0 <= u < h and 0 <= x < w else np.zeros(img.shape[2])

    return (v(yl, xl), v(yl, xl + 1), v(yl + 1, xl), v(yl + 1, xl + 1)), py - yl, px - xl, yl, xl


def _inside(py, px, h, w):
    return py > -1 and px > -1 and py < h and px < w


def unpack_dcnv4(offset_mask, groups, k):
    """DCNv4's [N, Ho, Wo, P] -> DCNv3's offset [N, Ho, Wo, G*K*2] and mask [N, Ho, Wo, G*K]."""
    om = np.asarray(offset_mask, np.float64)
    n, ho, wo, _ = om.shape
    per = om[..., : 3 * groups * k].reshape(n, ho, wo, groups, 3 * k)
    offset = per[..., : 2 * k].reshape(n, ho, wo, groups * 2 * k)
    mask = per[..., 2 * k :].reshape(n, ho, wo, groups * k)
    return offset, mask


def pack_dcnv4(offset, mask, groups, k, channels):
    """DCNv3's offset and mask -> DCNv4's offset_mask with `channels` (padding zeros)."""
    offset, mask = np.asarray(offset), np.asarray(mask)
    n, ho, wo, _ = offset.shape
    per = np.concatenate([offset.reshape(n, ho, wo, groups, 2 * k), mask.reshape(n, ho, wo, groups, k)], axis=-1)
    out = np.zeros((n, ho, wo, channels), per.dtype)
    out[..., : 3 * groups * k] = per.reshape(n, ho, wo, 3 * groups * k)
    return out


def _gated_points(x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    """Every sampled point that passes the gate, in order: (n, oh, ow, channel slice of its
    group, offset index of its dx (dy follows), mask index, mask value, corner values
    (v00, v01, v10, v11) over the group's channels, ly, lx, yl, xl)."""
    n_, h, w, c = x.shape
    d = c // groups
    tap_list = taps(kernel_size, remove_center)
    k_ = len(tap_list)
    ho, wo = output_size(h, w, kernel_size, stride, padding, dilation)
    for n in range(n_):
        for oh in range(ho):
            for ow in range(wo):
                for g in range(groups):
                    sl = slice(g * d, (g + 1) * d)
                    for k, (i, j) in enumerate(tap_list):
                        o, mi = (g * k_ + k) * 2, g * k_ + k
                        dx, dy = offset[n, oh, ow, o], offset[n, oh, ow, o + 1]
                        py, px = sampling_point(oh, ow, i, j, dx, dy, kernel_size, stride, padding, dilation,
                                                offset_scale)
                        if not _inside(py, px, h, w):
                            continue
                        corners, ly, lx, yl, xl = _corners(x[n, :, :, sl], py, px)
                        yield n, oh, ow, sl, o, mi, mask[n, oh, ow, mi], corners, ly, lx, yl, xl


def dcnv3(x, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
          remove_center=False):
    x, offset, mask = (np.asarray(a, np.float64) for a in (x, offset, mask))
    n_, h, w, c = x.shape
    ho, wo = output_size(h, w, kernel_size, stride, padding, dilation)
    y = np.zeros((n_, ho, wo, c))
    for n, oh, ow, sl, _, _, m, (v00, v01, v10, v11), ly, lx, _, _ in _gated_points(
            x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
        sample = (1 - ly) * (1 - lx) * v00 + (1 - ly) * lx * v01 + ly * (1 - lx) * v10 + ly * lx * v11
        y[n, oh, ow, sl] += m * sample
    return y


def dcnv3_backward(gy, x, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
                   remove_center=False):
    """(grad_x, grad_offset, grad_mask) of sum(gy * dcnv3(...)); the offset derivative at an
    integer position is the one from the floor side (the interpolant on [floor, floor+1])."""
    gy, x, offset, mask = (np.asarray(a, np.float64) for a in (gy, x, offset, mask))
    _, h, w, _ = x.shape
    gx, goff, gm = np.zeros_like(x), np.zeros_like(offset), np.zeros_like(mask)
    for n, oh, ow, sl, o, mi, m, (v00, v01, v10, v11), ly, lx, yl, xl in _gated_points(
            x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
        grad = gy[n, oh, ow, sl]
        sample = (1 - ly) * (1 - lx) * v00 + (1 - ly) * lx * v01 + ly * (1 - lx) * v10 + ly * lx * v11
        gm[n, oh, ow, mi] = np.dot(grad, sample)
        ds_dx = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
        ds_dy = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
        goff[n, oh, ow, o] = offset_scale * m * np.dot(grad, ds_dx)
        goff[n, oh, ow, o + 1] = offset_scale * m * np.dot(grad, ds_dy)
        for u, xx, wt in ((yl, xl, (1 - ly) * (1 - lx)), (yl, xl + 1, (1 - ly) * lx),
                          (yl + 1, xl, ly * (1 - lx)), (yl + 1, xl + 1, ly * lx)):
            if 0 <= u < h and 0 <= xx < w:
                gx[n, u, xx, sl] += m * wt * grad
    return gx, goff, gm


def dcnv4(x, offset_mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
          remove_center=False):
    k = len(taps(kernel_size, remove_center))
    offset, mask = unpack_dcnv4(offset_mask, groups, k)
    return dcnv3(x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center)


def dcnv4_backward(gy, x, offset_mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
                   remove_center=False):
    """(grad_x, grad_offset_mask); the padding channels (from 3*G*K up) get zeros."""
    k = len(taps(kernel_size, remove_center))
    offset, mask = unpack_dcnv4(offset_mask, groups, k)
    gx, goff, gm = dcnv3_backward(gy, x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale,
                                  remove_center)
    return gx, pack_dcnv4(goff, gm, groups, k, np.shape(offset_mask)[-1])
