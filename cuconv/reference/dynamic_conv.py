"""float64 NumPy ground truth for dynamic_conv2d, odconv2d and warehouse_conv2d, forward
and backward. Written for clarity: the per-sample kernels ARE materialised here, and
each sample is one cuconv.reference.conv2d call; the backward applies the chain rule
to that per-sample conv (conv2d_backward) and then to the kernel aggregation."""

from __future__ import annotations

import numpy as np

from .conv2d import conv2d, conv2d_backward


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _conv_params(stride, padding, dilation, groups):
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


# --- warehouse: the general kernel assembly ---

def _slot_grid(cells, kernel_shape):
    """(number of slots along Cout, Cin/g, kh, kw) for cells [n, co, ci, ckh, ckw]."""
    return tuple(k // c for k, c in zip(kernel_shape, cells.shape[1:]))


def assemble_kernels(cells, attention, kernel_shape):
    """Per-sample kernels [B, Cout, Cin/g, kh, kw]: slot (so, sc, sy, sx) (row-major slot
    index s) of sample b is sum_j attention[b, s, j] * cells[j]."""
    cells, attention = _f64(cells), _f64(attention)
    n, co, ci, ch, cw = cells.shape
    grid = _slot_grid(cells, kernel_shape)
    w = np.zeros((attention.shape[0], *kernel_shape))
    for s, (so, sc, sy, sx) in enumerate(np.ndindex(*grid)):
        block = np.einsum("bj,joiyx->boiyx", attention[:, s], cells)
        w[:, so * co:(so + 1) * co, sc * ci:(sc + 1) * ci, sy * ch:(sy + 1) * ch, sx * cw:(sx + 1) * cw] = block
    return w


def _disassemble(grad_kernels, cells, attention, kernel_shape):
    """Chain rule through assemble_kernels: (grad_cells, grad_attention)."""
    cells, attention = _f64(cells), _f64(attention)
    n, co, ci, ch, cw = cells.shape
    grad_cells, grad_att = np.zeros_like(cells), np.zeros_like(attention)
    for s, (so, sc, sy, sx) in enumerate(np.ndindex(*_slot_grid(cells, kernel_shape))):
        block = grad_kernels[:, so * co:(so + 1) * co, sc * ci:(sc + 1) * ci, sy * ch:(sy + 1) * ch,
                             sx * cw:(sx + 1) * cw]
        grad_cells += np.einsum("bj,boiyx->joiyx", attention[:, s], block)
        grad_att[:, s] = np.einsum("boiyx,joiyx->bj", block, cells)
    return grad_cells, grad_att


def _per_sample_conv(x, kernels, params):
    return np.stack([conv2d(x[b:b + 1], kernels[b], None, **params)[0] for b in range(x.shape[0])]) \
        if x.shape[0] else None


def _per_sample_backward(gy, x, kernels, params):
    """(grad_x, grad_kernels [B, ...]) of sum(gy * per-sample conv)."""
    gx, gk = np.zeros_like(x), np.zeros_like(kernels)
    for b in range(x.shape[0]):
        gxb, gkb, _ = conv2d_backward(gy[b:b + 1], x[b:b + 1], kernels[b], None, **params)
        gx[b], gk[b] = gxb[0], gkb
    return gx, gk


def _empty_output(x, kernel_shape, params):
    """The output of a batch-0 call: conv2d's shape on a one-sample stand-in."""
    probe = conv2d(np.zeros((1, *x.shape[1:])), np.zeros(kernel_shape), None, **params)
    return np.zeros((0, *probe.shape[1:]))


def warehouse_conv2d(x, cells, attention, stride=1, padding=0, dilation=1, groups=1, kernel_shape=None):
    x = _f64(x)
    params = _conv_params(stride, padding, dilation, groups)
    kernels = assemble_kernels(cells, attention, tuple(kernel_shape))
    y = _per_sample_conv(x, kernels, params)
    return _empty_output(x, tuple(kernel_shape), params) if y is None else y


def warehouse_conv2d_backward(gy, x, cells, attention, stride=1, padding=0, dilation=1, groups=1,
                              kernel_shape=None):
    """(grad_x, grad_cells, grad_attention)."""
    gy, x = _f64(gy), _f64(x)
    params = _conv_params(stride, padding, dilation, groups)
    kernels = assemble_kernels(cells, attention, tuple(kernel_shape))
    gx, gk = _per_sample_backward(gy, x, kernels, params)
    grad_cells, grad_att = _disassemble(gk, cells, attention, tuple(kernel_shape))
    return gx, grad_cells, grad_att


# --- dynamic_conv2d ---

def dynamic_conv2d(x, weight, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x, weight, attention = _f64(x), _f64(weight), _f64(attention)
    params = _conv_params(stride, padding, dilation, groups)
    kernels = np.einsum("bk,koiyx->boiyx", attention, weight)  # W_b = sum_k a[b,k] W_k
    y = _per_sample_conv(x, kernels, params)
    if y is None:
        return _empty_output(x, weight.shape[1:], params)
    if bias is not None:
        y += (attention @ _f64(bias))[:, :, None, None]
    return y


def dynamic_conv2d_backward(gy, x, weight, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """(grad_x, grad_weight, grad_attention, grad_bias); grad_bias is None without bias."""
    gy, x, weight, attention = _f64(gy), _f64(x), _f64(weight), _f64(attention)
    params = _conv_params(stride, padding, dilation, groups)
    kernels = np.einsum("bk,koiyx->boiyx", attention, weight)
    gx, gk = _per_sample_backward(gy, x, kernels, params)
    grad_weight = np.einsum("bk,boiyx->koiyx", attention, gk)  # sum_b a[b,k] dW_b
    grad_att = np.einsum("boiyx,koiyx->bk", gk, weight)        # <dW_b, W_k>
    grad_bias = None
    if bias is not None:
        gy_sum = gy.sum(axis=(2, 3))                            # [B, Cout]
        grad_att += gy_sum @ _f64(bias).T
        grad_bias = attention.T @ gy_sum
    return gx, grad_weight, grad_att, grad_bias


# --- odconv2d ---

def _ones_or(a, shape):
    return np.ones(shape) if a is None else _f64(a)


def odconv2d(x, weight, kernel_attention, spatial_attention=None, channel_attention=None, filter_attention=None,
             stride=1, padding=0, dilation=1, groups=1):
    x, weight = _f64(x), _f64(weight)
    b, (_, cout, _, kh, kw) = x.shape[0], weight.shape
    sa = _ones_or(spatial_attention, (b, kh, kw))
    ca = _ones_or(channel_attention, (b, x.shape[1]))
    fa = _ones_or(filter_attention, (b, cout))
    params = _conv_params(stride, padding, dilation, groups)
    kernels = np.einsum("bk,koiyx,byx->boiyx", _f64(kernel_attention), weight, sa)
    y = _per_sample_conv(x * ca[:, :, None, None], kernels, params)
    if y is None:
        return _empty_output(x, weight.shape[1:], params)
    return y * fa[:, :, None, None]


def odconv2d_backward(gy, x, weight, kernel_attention, spatial_attention=None, channel_attention=None,
                      filter_attention=None, stride=1, padding=0, dilation=1, groups=1):
    """(grad_x, grad_weight, grad_ka, grad_sa, grad_ca, grad_fa); None for a None attention."""
    gy, x, weight, ka = _f64(gy), _f64(x), _f64(weight), _f64(kernel_attention)
    b, (_, cout, _, kh, kw) = x.shape[0], weight.shape
    sa = _ones_or(spatial_attention, (b, kh, kw))
    ca = _ones_or(channel_attention, (b, x.shape[1]))
    fa = _ones_or(filter_attention, (b, cout))
    params = _conv_params(stride, padding, dilation, groups)
    mixed = np.einsum("bk,koiyx->boiyx", ka, weight)            # M_b (before sa)
    kernels = mixed * sa[:, None, None]
    xs = x * ca[:, :, None, None]
    inner = _per_sample_conv(xs, kernels, params)
    g_inner = gy * fa[:, :, None, None]
    gxs, gk = _per_sample_backward(g_inner, xs, kernels, params)
    grad_x = gxs * ca[:, :, None, None]
    grad_ca = np.einsum("bihw,bihw->bi", gxs, x)
    grad_sa = np.einsum("boiyx,boiyx->byx", gk, mixed)
    gm = gk * sa[:, None, None]                                   # gradient w.r.t. M_b
    grad_weight = np.einsum("bk,boiyx->koiyx", ka, gm)
    grad_ka = np.einsum("boiyx,koiyx->bk", gm, weight)
    grad_fa = np.zeros((0, cout)) if inner is None else np.einsum("bohw,bohw->bo", gy, inner)
    return (grad_x, grad_weight, grad_ka, None if spatial_attention is None else grad_sa,
            None if channel_attention is None else grad_ca, None if filter_attention is None else grad_fa)
