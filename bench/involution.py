"""involution suite: the self-check of involution2d (forward and both gradients) against
cuconv.reference, and RedNet-50's 7x7 involution layers (G = C/16) timed against (a) the
unfold formulation in torch (F.unfold, multiply, sum over taps: what the official
involution code runs when its CuPy kernels are off) and (b) a static depthwise
F.conv2d of the same shape (one 7x7 filter per channel instead of one per pixel: the
price of the kernel being dynamic)."""

from __future__ import annotations

import cuconv
from cuconv.ops.involution import involution2d, involution2d_backward
from cuconv.reference import involution as reference

from .harness import FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes, timed_layers

NAME = "involution"
OPS = ("involution2d",)  # the public ops it checks and times


def _shapes(x_shape, groups, k, stride=1, padding=0, dilation=1):
    """(input, kernel) shapes: the kernel [B, G, kh, kw, Ho, Wo] that fits the input."""
    b, _, h, w = x_shape
    out_h, out_w = cuconv.conv_output_size((h, w), k, stride, padding, dilation)
    return x_shape, (b, groups, k[0], k[1], out_h, out_w)


# --- self-check: small odd shapes that cover every parameter ---

# (label, (input, kernel) shapes, params)
CHECK = [
    ("7x7 p3 G=C/4", _shapes((2, 8, 11, 9), 2, (7, 7), 1, 3), dict(padding=3)),
    ("3x3 s2 p1 G=1", _shapes((2, 6, 10, 9), 1, (3, 3), 2, 1), dict(stride=2, padding=1)),
    ("3x2 s(1,2) d(2,1) G=C", _shapes((1, 5, 9, 12), 5, (3, 2), (1, 2), (2, 0), (2, 1)),
     dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1))),
    ("5x5 s2 p2 d2 G=3", _shapes((2, 12, 13, 11), 3, (5, 5), 2, 2, 2), dict(stride=2, padding=2, dilation=2)),
]


def torch_unfold(F, x, k, stride=1, padding=0, dilation=1):
    """The unfold formulation of d-li14/involution on torch tensors (the self-check's
    fp16/bf16 anchor, a benchmark baseline and the tests' oracle)."""
    b, c = x.shape[:2]
    _, g, kh, kw, out_h, out_w = k.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, Ho*Wo]
    cols = cols.view(b, g, c // g, kh * kw, out_h, out_w)
    return (cols * k.reshape(b, g, 1, kh * kw, out_h, out_w)).sum(dim=3).reshape(b, c, out_h, out_w)


INVOLUTION = OpCheck("involution2d", involution2d, involution2d_backward, reference.involution2d,
                     reference.involution2d_backward, torch_unfold, ("input", "kernel"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return self_check_op(INVOLUTION, CHECK, dtypes, backends, rng, torch_module)


# --- benchmark ---

BATCH = 32
KERNEL = 7
# RedNet-50's involution layers (the bottleneck's 3x3 conv replaced by a 7x7 involution,
# G = channels / 16): (label, channels, input height = width, stride). Stride 1 in the four
# stages (64 channels at 56x56, doubling as the size halves), stride 2 entering stages 2-4.
_STAGES = [(64 << i, 56 >> i) for i in range(4)]
REDNET50 = ([(f"inv7x7 {c} {size}", c, size, 1) for c, size in _STAGES]
            + [(f"inv7x7/2 {2 * c} {size}", 2 * c, size, 2) for c, size in _STAGES[:3]])
QUICK = ("inv7x7 64 56", "inv7x7 512 7", "inv7x7/2 128 56")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """Forward and forward+backward cases; baselines need torch (CuPy arrays otherwise)."""
    cases = []
    for dtype in timed_dtypes(dtypes, torch_module):
        for label, channels, size, stride in timed_layers(REDNET50, quick, QUICK):
            x_shape, k_shape = _shapes((BATCH, channels, size, size), channels // 16, (KERNEL, KERNEL), stride,
                                       KERNEL // 2)
            out = k_shape[4]
            flops = 2.0 * BATCH * channels * out * out * KERNEL * KERNEL
            for pass_ in FWD_BWD:
                cases.append(_case(label, dtype, pass_, x_shape, k_shape, stride, flops, torch_module))
    return cases


def _case(label, dtype, pass_, x_shape, k_shape, stride, flops, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    pad = KERNEL // 2
    y_shape = x_shape[:2] + k_shape[4:]
    shapes, scales = [x_shape, k_shape], [1.0, KERNEL**-1]
    if backward:
        shapes, scales = shapes + [y_shape], scales + [1.0]

    def run_cuconv(x, k, gy=None):
        involution2d(x, k, stride=stride, padding=pad)
        if backward:
            involution2d_backward(gy, x, k, stride=stride, padding=pad)

    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1),
                     random_inputs(shapes, dtype, backward, scales, torch), run_cuconv,
                     _baselines(torch, stride, pad, backward))


def _baselines(torch, stride, pad, backward) -> dict:
    def run_one_thread_per_output(x, k, gy=None):
        """The official CuPy kernel's design (one thread per output, reading device memory),
        as cuconv's own direct kernel; the backward is cuconv's either way."""
        involution2d(x, k, stride=stride, padding=pad, algorithm="direct")
        if backward:
            involution2d_backward(gy, x, k, stride=stride, padding=pad)

    direct = {"one thread/output": (lambda s: s, run_one_thread_per_output)}
    if torch is None:
        return direct
    F = torch.nn.functional

    def run_unfold(x, k, gy=None):
        y = torch_unfold(F, x, k, stride=stride, padding=pad)
        if backward:
            torch.autograd.grad(y, (x, k), gy)

    def to_depthwise(input_set):
        """The same input and grad_output with a static [C, 1, 7, 7] weight for the kernel."""
        x, k, *rest = input_set
        w = (torch.randn(x.shape[1], 1, KERNEL, KERNEL, device=x.device, dtype=x.dtype) / KERNEL)
        return (x, w.requires_grad_(backward), *rest)

    def run_depthwise(x, w, gy=None):
        y = F.conv2d(x, w, None, stride, pad, groups=x.shape[1])
        if backward:
            torch.autograd.grad(y, (x, w), gy)

    return {**direct, "torch unfold": (lambda s: s, run_unfold), "torch dw conv": (to_depthwise, run_depthwise)}
