"""dynamic_conv suite: the self-check of dynamic_conv2d, odconv2d and warehouse_conv2d
(forward and every gradient) against cuconv.reference, and ResNet-50 / MobileNetV2 layer
shapes with K = 4 kernels timed against two torch baselines: the batch-folded grouped
conv that materialises the per-sample kernels (what the official CondConv / ODConv code
does) and a static F.conv2d of the same shape (the cost floor a dynamic conv chases).

K = 4: DY-CNN's choice (CondConv uses 8 for its largest models); the fused kernels'
cost grows with ceil(K / 8) passes in the attention / weight gradients, so 4 and 8 time
alike there, while the forward's on-chip mixture costs K FMAs per staged kernel entry."""

from __future__ import annotations

from cuconv.ops.dynamic_conv import (
    dynamic_conv2d,
    dynamic_conv2d_backward,
    odconv2d,
    odconv2d_backward,
    warehouse_conv2d,
    warehouse_conv2d_backward,
)
from cuconv.reference import dynamic_conv as reference

from .harness import FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes, timed_layers

NAME = "dynamic_conv"
OPS = ("dynamic_conv2d", "odconv2d", "warehouse_conv2d")  # the public ops it checks and times

# --- torch formulations: the batch-folded grouped conv, autograd through the aggregation
# (the self-check's fp16/bf16 anchor, the benchmark baseline and the tests' oracle) ---


def folded_conv(F, x, kernels, stride=1, padding=0, dilation=1, groups=1):
    """conv(x[b], kernels[b]) for every b as one grouped conv over the folded batch."""
    b, cin, h, w = x.shape
    cout = kernels.shape[1]
    y = F.conv2d(x.reshape(1, b * cin, h, w), kernels.reshape(b * cout, *kernels.shape[2:]), None, stride, padding,
                 dilation, b * groups)
    return y.reshape(b, cout, *y.shape[2:])


def torch_dynamic(F, x, w, a, bias=None, **params):
    import torch

    y = folded_conv(F, x, torch.einsum("bk,koiyx->boiyx", a, w), **params)
    return y if bias is None else y + (a @ bias)[:, :, None, None]


def torch_odconv(F, x, w, ka, sa=None, ca=None, fa=None, **params):
    import torch

    kernels = torch.einsum("bk,koiyx->boiyx", ka, w)
    if sa is not None:
        kernels = kernels * sa[:, None, None]
    y = folded_conv(F, x if ca is None else x * ca[:, :, None, None], kernels, **params)
    return y if fa is None else y * fa[:, :, None, None]


def torch_warehouse(F, x, cells, att, kernel_shape=None, **params):
    """The slots as a [B, so, sc, sy, sx] grid of cell mixtures, interleaved into the kernel."""
    import torch

    n, co, ci, ch, cw = cells.shape
    grid = [k // c for k, c in zip(kernel_shape, (co, ci, ch, cw))]
    blocks = torch.einsum("bsj,joiyx->bsoiyx", att, cells).reshape(att.shape[0], *grid, co, ci, ch, cw)
    kernels = blocks.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(att.shape[0], *kernel_shape)
    return folded_conv(F, x, kernels, **params)


# --- self-check: small odd shapes that cover every parameter ---

DYNAMIC_CHECK = [
    ("dyn K3 3x3 p1 bias", ((2, 6, 9, 11), (3, 5, 6, 3, 3), (2, 3), (3, 5)), dict(padding=1)),
    ("dyn K4 3x2 s2 g2", ((2, 4, 10, 9), (4, 6, 2, 3, 2), (2, 4), None), dict(stride=2, padding=(1, 0), groups=2)),
    ("dyn K9 same d2 bias", ((1, 3, 8, 9), (9, 4, 3, 3, 3), (1, 9), (9, 4)), dict(padding="same", dilation=2)),
]
ODCONV_CHECK = [
    ("od K4 3x3 all att", ((2, 6, 9, 10), (4, 5, 6, 3, 3), (2, 4), (2, 3, 3), (2, 6), (2, 5)), dict(padding=1)),
    ("od K2 s2 g2 sa,fa", ((2, 4, 11, 9), (2, 6, 2, 3, 3), (2, 2), (2, 3, 3), None, (2, 6)),
     dict(stride=2, groups=2)),
    ("od K3 5x5 same ca", ((1, 3, 9, 8), (3, 4, 3, 5, 5), (1, 3), None, (1, 3), None), dict(padding="same")),
]
WAREHOUSE_CHECK = [
    ("wh 8 slots n4 3x3", ((2, 8, 9, 10), (4, 3, 2, 3, 3), (2, 8, 4)), dict(padding=1, kernel_shape=(6, 8, 3, 3))),
    ("wh 4 slots n3 s2 g2", ((2, 4, 10, 9), (3, 2, 1, 3, 1), (2, 4, 3)),
     dict(stride=2, groups=2, kernel_shape=(4, 2, 3, 1))),
]

DYNAMIC = OpCheck("dynamic_conv2d", dynamic_conv2d, dynamic_conv2d_backward, reference.dynamic_conv2d,
                  reference.dynamic_conv2d_backward, torch_dynamic, ("input", "weight", "attention", "bias"))
ODCONV = OpCheck("odconv2d", odconv2d, odconv2d_backward, reference.odconv2d, reference.odconv2d_backward, torch_odconv,
                 ("input", "weight", "ka", "sa", "ca", "fa"))
WAREHOUSE = OpCheck("warehouse_conv2d", warehouse_conv2d, warehouse_conv2d_backward, reference.warehouse_conv2d,
                    reference.warehouse_conv2d_backward, torch_warehouse, ("input", "cells", "attention"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return (self_check_op(DYNAMIC, DYNAMIC_CHECK, dtypes, backends, rng, torch_module)
            + self_check_op(ODCONV, ODCONV_CHECK, dtypes, backends, rng, torch_module)
            + self_check_op(WAREHOUSE, WAREHOUSE_CHECK, dtypes, backends, rng, torch_module))


# --- benchmark ---

BATCH = 32
K = 4
# (label, in channels, out channels, input height = width, kernel, stride, groups)
LAYERS = [
    ("r50 3x3 64 56", 64, 64, 56, 3, 1, 1),
    ("r50 3x3 128 28", 128, 128, 28, 3, 1, 1),
    ("r50 3x3 256 14", 256, 256, 14, 3, 1, 1),
    ("r50 3x3 512 7", 512, 512, 7, 3, 1, 1),
    ("r50 1x1 256->64 56", 256, 64, 56, 1, 1, 1),
    ("r50 1x1 1024->256 14", 1024, 256, 14, 1, 1, 1),
    ("mbv2 1x1 32->192 28", 32, 192, 28, 1, 1, 1),
    ("mbv2 1x1 576->96 14", 576, 96, 14, 1, 1, 1),
    ("mbv2 dw3x3 384 14", 384, 384, 14, 3, 1, 384),
    ("mbv2 dw3x3/2 144 56", 144, 144, 56, 3, 2, 144),
]
QUICK = ("r50 3x3 128 28", "r50 1x1 256->64 56", "mbv2 dw3x3 384 14")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """dynamic_conv2d and odconv2d (all four attentions) forward and forward+backward
    (every gradient) per layer and dtype; baselines need torch (CuPy arrays otherwise,
    no baselines)."""
    cases = []
    for dtype in timed_dtypes(dtypes, torch_module):
        for label, cin, cout, size, k, stride, groups in timed_layers(LAYERS, quick, QUICK):
            pad = k // 2
            out = (size + 2 * pad - k) // stride + 1
            flops = 2.0 * BATCH * cout * (cin // groups) * k * k * out * out
            params = dict(stride=stride, padding=pad, groups=groups)
            for variant in ("dynamic", "odconv"):
                shapes = [(BATCH, cin, size, size), (K, cout, cin // groups, k, k), (BATCH, K)]
                scales = [1.0, (cin // groups * k * k) ** -0.5, 1.0 / K]
                if variant == "odconv":  # spatial, channel and filter attentions, near 1 like sigmoids
                    shapes += [(BATCH, k, k), (BATCH, cin), (BATCH, cout)]
                    scales += [0.5, 0.5, 0.5]
                for pass_ in FWD_BWD:
                    cases.append(_case(variant, f"{variant} {label}", dtype, pass_, shapes, scales,
                                       (BATCH, cout, out, out), params, flops, torch_module))
    return cases


_VARIANTS = {  # the op, its backward, and the torch batch-folded baseline
    "dynamic": (dynamic_conv2d, dynamic_conv2d_backward, torch_dynamic),
    "odconv": (odconv2d, odconv2d_backward, torch_odconv),
}


def _case(variant, label, dtype, pass_, shapes, scales, y_shape, params, flops, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    op, op_backward, folded = _VARIANTS[variant]
    if backward:
        shapes, scales = shapes + [y_shape], scales + [1.0]

    def split(inputs):  # (arrays..., gy) -> (arrays, gy); gy is there only for fwd+bwd
        return (inputs[:-1], inputs[-1]) if backward else (inputs, None)

    def run_cuconv(*inputs):
        arrays, gy = split(inputs)
        op(*arrays, **params)
        if backward:
            op_backward(gy, *arrays, **params)

    baselines = {}
    if torch is not None:
        F = torch.nn.functional

        def run_folded(*inputs):
            arrays, gy = split(inputs)
            y = folded(F, *arrays, **params)
            if backward:
                torch.autograd.grad(y, arrays, gy)

        def run_static(*inputs):
            (x, w, *_), gy = split(inputs)
            y = F.conv2d(x, w[0], None, **params)
            if backward:
                torch.autograd.grad(y, (x, w), gy, allow_unused=True)

        baselines = {"torch folded": (lambda s: s, run_folded), "torch static": (lambda s: s, run_static)}
    if variant == "dynamic" and dtype in ("float16", "bfloat16"):
        def run_implicit_gemm(*inputs):  # the tensor-core forward and input gradient
            arrays, gy = split(inputs)
            op(*arrays, **params, algorithm="implicit_gemm")
            if backward:
                op_backward(gy, *arrays, **params, algorithm="implicit_gemm")

        baselines["cuconv implicit_gemm"] = (lambda s: s, run_implicit_gemm)
    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1),
                     random_inputs(shapes, dtype, backward, scales, torch), run_cuconv, baselines)
