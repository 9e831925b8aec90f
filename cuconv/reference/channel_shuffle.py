"""float64 NumPy ground truth for channel_shuffle, forward and backward. Written to be
read: one reshape that names the (group, index in group) axes of the channels, one swap
of those axes, one reshape that merges them. Shares nothing with the kernel (no flat
index arithmetic)."""

from __future__ import annotations

import numpy as np


def channel_shuffle(x, groups):
    """[N, C, *] -> [N, C, *]: out[:, j*groups + i] = x[:, i*(C/groups) + j] (dim 1 is the channels)."""
    x = np.asarray(x, np.float64)
    n, c, *spatial = x.shape
    assert c % groups == 0, (x.shape, groups)
    # channel i*(C/g) + j -> axes (i, j); swapped to (j, i), channel j*g + i
    t = x.reshape(n, groups, c // groups, *spatial)
    t = t.swapaxes(1, 2)
    return t.reshape(n, c, *spatial)


def channel_shuffle_backward(gy, x, groups):
    """(grad_x,) of sum(gy * channel_shuffle(x, groups)): a permutation's adjoint is its
    inverse, and the inverse of swapping a [g, C/g] view is swapping the [C/g, g] view."""
    c = np.shape(x)[1]
    gx = channel_shuffle(gy, c // groups) if c else np.asarray(gy, np.float64)
    assert gx.shape == np.shape(x), (gx.shape, np.shape(x))
    return (gx,)
