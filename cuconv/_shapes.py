"""Every op's array arguments and output shape, from shapes alone (no arrays, no kernels).

Framework adapters need these to trace an op without running it: torch's fake tensors
under torch.compile, the result shapes of jax.pure_callback under jit. Each op's own
geometry check runs on `ShapeArgs`, a stand-in for its Call that only knows shapes, so
a bad shape raises the same error it would at run time.
"""

from __future__ import annotations

import sys

from .ops.conv2d import conv_geometry
from .ops.conv_transpose2d import transposed_geometry


def _module(name: str):
    return sys.modules[f"cuconv.ops.{name}"]  # the attribute of that name is the function


class ShapeArgs:
    """Stands in for an op's Call in its geometry checks: the arguments' shapes only."""

    def __init__(self, **shapes):
        self._shapes = {n: None if s is None else tuple(int(v) for v in s) for n, s in shapes.items()}

    def shape(self, name: str):
        return self._shapes.get(name)


# Every op's array arguments in order: the forward takes them first, the backward returns
# one gradient per entry. The rest of an op's arguments are parameters.
ARRAY_ARGS = {
    "conv2d": ("input", "weight", "bias"),
    "conv_transpose2d": ("input", "weight", "bias"),
    "subpixel_conv2d": ("input", "weight", "bias"),
    "depthwise_separable_conv2d": ("input", "depthwise_weight", "pointwise_weight", "depthwise_bias",
                                   "pointwise_bias"),
    "spatial_separable_conv2d": ("input", "weight_v", "weight_h", "bias"),
    "pixel_shuffle": ("input",),
    "pixel_unshuffle": ("input",),
    "deform_conv2d": ("input", "offset", "weight", "bias", "mask"),
    "involution2d": ("input", "kernel"),
    "dynamic_conv2d": ("input", "weight", "attention", "bias"),
    "odconv2d": ("input", "weight", "kernel_attention", "spatial_attention", "channel_attention",
                 "filter_attention"),
    "warehouse_conv2d": ("input", "cells", "attention"),
    "spectral_filter2d": ("input", "filter"),
}
# Arrays an op passes by keyword (not in forward-argument position right after the others).
KEYWORD_ARRAYS = {"deform_conv2d": ("mask",)}
# Complex array arguments (their dtype pairs with the real ones: complex64 with float32).
COMPLEX_ARGS = {"spectral_filter2d": ("filter",)}


def _conv(op, s, stride=1, padding=0, dilation=1, groups=1, algorithm="auto"):
    return conv_geometry(op, s.shape("input"), s.shape("weight"), s.shape("bias"), stride, padding, dilation,
                         groups).output_shape


def _conv_transpose(op, s, stride=1, padding=0, output_padding=0, groups=1, dilation=1, algorithm="auto"):
    g = transposed_geometry(op, s.shape("input"), s.shape("weight"), s.shape("bias"), stride, padding,
                            output_padding, groups, dilation)
    return (g.batch, g.in_channels, g.in_h, g.in_w)


def _subpixel(op, s, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1, algorithm="auto"):
    geom = conv_geometry(op, s.shape("input"), s.shape("weight"), s.shape("bias"), stride, padding, dilation, groups)
    r = int(upscale_factor)
    return (geom.batch, geom.out_channels // (r * r), geom.out_h * r, geom.out_w * r)


def _depthwise_separable(op, s, stride=1, padding=0, dilation=1):
    geom, cout = _module("separable")._depthwise_geometry(op, s, stride, padding, dilation)
    return (geom.batch, cout, geom.out_h, geom.out_w)


def _spatial_separable(op, s, stride=1, padding=0, dilation=1, groups=1):
    return _module("separable")._spatial_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


def _pixel_shuffle(op, s, upscale_factor):
    return tuple(_module("pixel_shuffle")._shuffle_geometry(op, s.shape("input"), upscale_factor,
                                                            "upscale_factor")[1])


def _pixel_unshuffle(op, s, downscale_factor):
    return tuple(_module("pixel_shuffle")._unshuffle_geometry(op, s.shape("input"), downscale_factor,
                                                              "downscale_factor")[1])


def _deform(op, s, stride=1, padding=0, dilation=1):
    return _module("deform_conv").DeformGeometry(op, s, stride, padding, dilation).output_shape


def _involution(op, s, stride=1, padding=0, dilation=1, algorithm="auto"):
    return _module("involution").Geometry(op, s, stride, padding, dilation).output_shape


def _dynamic(op, s, stride=1, padding=0, dilation=1, groups=1, algorithm="auto"):
    return _module("dynamic_conv")._dynamic_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


def _odconv(op, s, stride=1, padding=0, dilation=1, groups=1):
    return _module("dynamic_conv")._odconv_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


def _warehouse(op, s, stride=1, padding=0, dilation=1, groups=1, kernel_shape=None):
    return _module("dynamic_conv")._warehouse_geometry(op, s, kernel_shape, stride, padding, dilation,
                                                       groups)[0].output_shape


def _spectral(op, s):
    return s.shape("input")


_OUTPUT = {"conv2d": _conv, "conv_transpose2d": _conv_transpose, "subpixel_conv2d": _subpixel,
           "depthwise_separable_conv2d": _depthwise_separable, "spatial_separable_conv2d": _spatial_separable,
           "pixel_shuffle": _pixel_shuffle, "pixel_unshuffle": _pixel_unshuffle, "deform_conv2d": _deform,
           "involution2d": _involution, "dynamic_conv2d": _dynamic, "odconv2d": _odconv,
           "warehouse_conv2d": _warehouse, "spectral_filter2d": _spectral}


def output_shape(op: str, shapes: dict, **params) -> tuple[int, ...]:
    """The shape of op(...)'s result for array arguments of these shapes (name -> shape,
    None or absent for an absent optional array) and these parameters."""
    unknown = set(shapes) - set(ARRAY_ARGS[op])
    if unknown:
        raise KeyError(f"{op}: no array arguments {sorted(unknown)}; it has {ARRAY_ARGS[op]}")
    return tuple(int(v) for v in _OUTPUT[op](op, ShapeArgs(**shapes), **params))
