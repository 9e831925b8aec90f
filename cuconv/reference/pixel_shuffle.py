"""float64 NumPy ground truth for pixel_shuffle / pixel_unshuffle, forward and
backward. Written to be read: one reshape that names the sub-pixel axes, one
transpose that moves them, one reshape that merges them. Shares nothing with the
kernels (no flat index arithmetic)."""

from __future__ import annotations

import numpy as np


def pixel_shuffle(x, r):
    """[*, C*r*r, H, W] -> [*, C, H*r, W*r]: out[..., c, h*r+i, w*r+j] = x[..., c*r*r + i*r + j, h, w]."""
    x = np.asarray(x, np.float64)
    *lead, crr, h, w = x.shape
    assert crr % (r * r) == 0, (x.shape, r)
    c = crr // (r * r)
    k = len(lead)
    # channel c*r*r + i*r + j -> axes (c, i, j); then order (c, h, i, w, j)
    t = x.reshape(*lead, c, r, r, h, w)
    t = t.transpose(*range(k), k, k + 3, k + 1, k + 4, k + 2)
    return t.reshape(*lead, c, h * r, w * r)


def pixel_unshuffle(x, r):
    """[*, C, H*r, W*r] -> [*, C*r*r, H, W]: out[..., c*r*r + i*r + j, h, w] = x[..., c, h*r+i, w*r+j]."""
    x = np.asarray(x, np.float64)
    *lead, c, hr, wr = x.shape
    assert hr % r == 0 and wr % r == 0, (x.shape, r)
    h, w = hr // r, wr // r
    k = len(lead)
    # rows h*r + i -> axes (h, i), columns w*r + j -> axes (w, j); then order (c, i, j, h, w)
    t = x.reshape(*lead, c, h, r, w, r)
    t = t.transpose(*range(k), k, k + 2, k + 4, k + 1, k + 3)
    return t.reshape(*lead, c * r * r, h, w)


def pixel_shuffle_backward(gy, x, r):
    """(grad_x,) of sum(gy * pixel_shuffle(x, r)): a permutation's adjoint is its inverse."""
    gx = pixel_unshuffle(gy, r)
    assert gx.shape == np.shape(x), (gx.shape, np.shape(x))
    return (gx,)


def pixel_unshuffle_backward(gy, x, r):
    """(grad_x,) of sum(gy * pixel_unshuffle(x, r))."""
    gx = pixel_shuffle(gy, r)
    assert gx.shape == np.shape(x), (gx.shape, np.shape(x))
    return (gx,)
