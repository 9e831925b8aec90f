"""separable suite: the self-check of depthwise_separable_conv2d and
spatial_separable_conv2d (forward and every gradient) against cuconv.reference, and
MobileNetV2's depthwise + projection layers and an Inception-v3 7x1 / 1x7 pair timed
against two torch / cuDNN convolutions (NCHW and channels_last)."""

from __future__ import annotations

import cuconv
from cuconv.ops.separable import (
    depthwise_separable_conv2d,
    depthwise_separable_conv2d_backward,
    spatial_separable_conv2d,
    spatial_separable_conv2d_backward,
    spatial_stage_params,
)
from cuconv.reference import separable as reference

from .harness import (FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, tensor_bytes, timed_dtypes,
                      timed_layers, torch_baselines)

NAME = "separable"
OPS = ("depthwise_separable_conv2d", "spatial_separable_conv2d")  # the public ops it checks and times

# --- self-check: small odd shapes that cover every parameter ---


def _dw_shapes(x_shape, multiplier, k, cout, with_bias):
    mid = x_shape[1] * multiplier
    return (x_shape, (mid, 1, *k), (cout, mid, 1, 1), (mid,) if with_bias else None, (cout,) if with_bias else None)


def _sp_shapes(x_shape, cmid, cout, k, groups, with_bias):
    return (x_shape, (cmid, x_shape[1] // groups, k[0], 1), (cout, cmid // groups, 1, k[1]),
            (cout,) if with_bias else None)


# (label, (input, dw, pw, dw bias, pw bias) shapes, params)
DW_CHECK = [
    ("dw 3x3 p1 m1 biases", _dw_shapes((2, 6, 9, 11), 1, (3, 3), 5, True), dict(padding=1)),
    ("dw 3x3 s2 p1 m2", _dw_shapes((2, 4, 10, 9), 2, (3, 3), 7, False), dict(stride=2, padding=1)),
    ("dw 4x3 same d(1,2) m3 biases", _dw_shapes((1, 3, 8, 9), 3, (4, 3), 4, True),
     dict(padding="same", dilation=(1, 2))),
    ("dw 5x5 s(1,2) valid m1", _dw_shapes((2, 16, 11, 10), 1, (5, 5), 9, True), dict(stride=(1, 2), padding="valid")),
]
# (label, (input, weight_v, weight_h, bias) shapes, params)
SPATIAL_CHECK = [
    ("sp 7x1,1x7 p3 bias", _sp_shapes((2, 6, 11, 9), 8, 5, (7, 7), 1, True), dict(padding=3)),
    ("sp 3x1,1x5 s(2,1) g2", _sp_shapes((2, 4, 10, 12), 6, 4, (3, 5), 2, False),
     dict(stride=(2, 1), padding=(1, 2), groups=2)),
    ("sp 4x1,1x3 same d2 bias", _sp_shapes((1, 6, 9, 8), 9, 6, (4, 3), 3, True),
     dict(padding="same", dilation=2, groups=3)),
    ("sp 5x1,1x3 valid s2", _sp_shapes((2, 5, 13, 11), 7, 3, (5, 3), 1, True), dict(stride=2, padding="valid")),
]


def _torch_depthwise(F, x, dw, pw, dwb=None, pwb=None, **params):
    return F.conv2d(F.conv2d(x, dw, dwb, groups=x.shape[1], **params), pw, pwb)


def _torch_spatial(F, x, wv, wh, b=None, stride=1, padding=0, dilation=1, groups=1):
    vertical, horizontal = spatial_stage_params(NAME, stride, padding, dilation)
    return F.conv2d(F.conv2d(x, wv, None, groups=groups, **vertical), wh, b, groups=groups, **horizontal)


DW = OpCheck("depthwise_separable_conv2d", depthwise_separable_conv2d, depthwise_separable_conv2d_backward,
             reference.depthwise_separable_conv2d, reference.depthwise_separable_conv2d_backward, _torch_depthwise,
             ("input", "dw", "pw", "dw bias", "pw bias"))
SPATIAL = OpCheck("spatial_separable_conv2d", spatial_separable_conv2d, spatial_separable_conv2d_backward,
                  reference.spatial_separable_conv2d, reference.spatial_separable_conv2d_backward, _torch_spatial,
                  ("input", "wv", "wh", "bias"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return (self_check_op(DW, DW_CHECK, dtypes, backends, rng, torch_module)
            + self_check_op(SPATIAL, SPATIAL_CHECK, dtypes, backends, rng, torch_module))


# --- benchmark ---

BATCH = 32
# MobileNetV2 inverted residuals: the 3x3 depthwise conv on the expanded channels, then
# the 1x1 projection. (label, channels, input height = width, stride, out channels), the
# label "dw3x3[/2] channels size -> out channels" written from the numbers.
MOBILENET_V2 = [(f"dw3x3{'/2' if stride == 2 else ''} {c} {size} -> {cout}", c, size, stride, cout)
                for c, size, stride, cout in ((144, 56, 1, 24), (192, 28, 1, 32), (384, 14, 1, 64), (576, 14, 1, 96),
                                              (960, 7, 1, 160), (96, 112, 2, 24), (144, 56, 2, 32), (192, 28, 2, 64),
                                              (576, 14, 2, 160))]
# Inception-v3's 17x17 factorised 7x7: (label, in, mid, out channels, size, k)
INCEPTION = [("7x1,1x7 192 17 -> 192", 192, 192, 192, 17, 7)]
QUICK = ("dw3x3 144 56 -> 24", "dw3x3 960 7 -> 160", "dw3x3/2 144 56 -> 32", "7x1,1x7 192 17 -> 192")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """Forward and forward+backward cases; baselines need torch (CuPy arrays otherwise)."""
    cases = []
    for dtype in timed_dtypes(dtypes, torch_module):
        for label, channels, size, stride, cout in timed_layers(MOBILENET_V2, quick, QUICK):
            out = cuconv.conv_output_size(size, 3, stride, 1)
            flops = 2.0 * BATCH * out * out * channels * (9 + cout)
            shapes = [(BATCH, channels, size, size), (channels, 1, 3, 3), (cout, channels, 1, 1)]
            scales = [1.0, 1 / 3, channels**-0.5]
            cases += [_case(DW, label, dtype, pass_, shapes, scales, (BATCH, cout, out, out), flops, torch_module,
                            ("input", "depthwise_weight", "pointwise_weight"), stride=stride, padding=1)
                      for pass_ in FWD_BWD]
        for label, cin, cmid, cout, size, k in timed_layers(INCEPTION, quick, QUICK):
            flops = 2.0 * BATCH * size * size * k * (cmid * cin + cout * cmid)
            shapes = [(BATCH, cin, size, size), (cmid, cin, k, 1), (cout, cmid, 1, k)]
            scales = [1.0, (cin * k) ** -0.5, (cmid * k) ** -0.5]
            cases += [_case(SPATIAL, label, dtype, pass_, shapes, scales, (BATCH, cout, size, size), flops,
                            torch_module, ("input", "weight_v", "weight_h"), padding=k // 2)
                      for pass_ in FWD_BWD]
    return cases


def _case(spec: OpCheck, label, dtype, pass_, shapes, scales, y_shape, flops, torch, wrt, **params) -> BenchCase:
    """The op of `spec` (input and its two weights, no biases) against its two torch convs
    (spec.torch_forward), NCHW and channels_last."""
    backward = pass_ == "fwd+bwd"
    traffic = tensor_bytes(shapes + [y_shape], dtype) * (3 if backward else 1)  # the intermediate stays on chip
    if backward:
        shapes, scales = shapes + [y_shape], scales + [1.0]

    def run_cuconv(x, w1, w2, gy=None):
        spec.forward(x, w1, w2, **params)
        if backward:
            spec.backward(gy, x, w1, w2, **params, wrt=wrt)

    def run_torch(x, w1, w2, gy=None):
        y = spec.torch_forward(torch.nn.functional, x, w1, w2, **params)
        if backward:
            torch.autograd.grad(y, (x, w1, w2), gy)

    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1),
                     random_inputs(shapes, dtype, backward, scales, torch), run_cuconv,
                     torch_baselines(torch, run_torch), bytes_moved=traffic)
