"""float64 NumPy ground truth for the separable convolutions, forward and backward,
composed from cuconv.reference.conv2d (two convolutions and the chain rule) for
clarity. The stage split of a spatial-separable conv's stride/padding/dilation comes
from cuconv.ops.separable.spatial_stage_params (a parameter rule, not arithmetic)."""

from __future__ import annotations

import numpy as np

from ..ops.separable import spatial_stage_params
from .conv2d import conv2d, conv2d_backward


def depthwise_separable_conv2d(x, dw, pw, dw_bias=None, pw_bias=None, stride=1, padding=0, dilation=1):
    """conv2d(conv2d(x, dw, dw_bias, stride, padding, dilation, groups=C), pw, pw_bias)."""
    x = np.asarray(x, np.float64)
    mid = conv2d(x, dw, dw_bias, stride, padding, dilation, groups=x.shape[1])
    return conv2d(mid, pw, pw_bias)


def depthwise_separable_conv2d_backward(gy, x, dw, pw, dw_bias=None, pw_bias=None, stride=1, padding=0, dilation=1):
    """(grad_x, grad_dw, grad_pw, grad_dw_bias, grad_pw_bias); bias gradients are None
    where the bias is None."""
    x = np.asarray(x, np.float64)
    groups = x.shape[1]
    mid = conv2d(x, dw, dw_bias, stride, padding, dilation, groups=groups)
    grad_mid, grad_pw, grad_pw_bias = conv2d_backward(gy, mid, pw, pw_bias)
    grad_x, grad_dw, grad_dw_bias = conv2d_backward(grad_mid, x, dw, dw_bias, stride, padding, dilation, groups)
    return grad_x, grad_dw, grad_pw, grad_dw_bias, grad_pw_bias


def spatial_separable_conv2d(x, wv, wh, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(conv2d(x, wv, None, (sh,1), (ph,0), (dh,1), groups), wh, bias, (1,sw), (0,pw), (1,dw), groups)."""
    v, h = spatial_stage_params("reference.spatial_separable_conv2d", stride, padding, dilation)
    return conv2d(conv2d(x, wv, None, groups=groups, **v), wh, bias, groups=groups, **h)


def spatial_separable_conv2d_backward(gy, x, wv, wh, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """(grad_x, grad_wv, grad_wh, grad_bias); grad_bias is None without a bias."""
    v, h = spatial_stage_params("reference.spatial_separable_conv2d_backward", stride, padding, dilation)
    mid = conv2d(x, wv, None, groups=groups, **v)
    grad_mid, grad_wh, grad_bias = conv2d_backward(gy, mid, wh, bias, groups=groups, **h)
    grad_x, grad_wv, _ = conv2d_backward(grad_mid, x, wv, None, groups=groups, **v)
    return grad_x, grad_wv, grad_wh, grad_bias
