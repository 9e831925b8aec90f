"""conv_transpose2d suite: the self-check against cuconv.reference, and decoder layers
(U-Net 2x2/2 up-convolutions, DCGAN 4x4/2 generator layers) timed against torch /
cuDNN in NCHW and channels_last."""

from __future__ import annotations

import cuconv
from cuconv.reference import conv_transpose2d as reference

from .harness import (FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, tensor_bytes,
                      tensor_core_rows, timed_dtypes, timed_layers, torch_baselines)

NAME = "conv_transpose2d"

# (label, (input, weight, bias) shapes, params); weight is [Cin, Cout/groups, kh, kw]
CHECK_CONFIGS = [
    ("2x2/2 bias", ((2, 6, 5, 7), (6, 4, 2, 2), (4,)), dict(stride=2)),
    ("4x4/2 p1", ((1, 5, 6, 5), (5, 3, 4, 4), None), dict(stride=2, padding=1)),
    ("3x3/2 p1 op1 bias", ((2, 4, 5, 6), (4, 5, 3, 3), (5,)), dict(stride=2, padding=1, output_padding=1)),
    ("3x3 d2 groups=2 bias", ((1, 6, 7, 6), (6, 2, 3, 3), (4,)), dict(dilation=2, groups=2, padding=1)),
    ("3x(1,2) s(1,3) op(0,2)", ((2, 3, 5, 4), (3, 4, 3, 1), None), dict(stride=(1, 3), output_padding=(0, 2))),
]
CHECK = OpCheck(NAME, cuconv.conv_transpose2d, cuconv.conv_transpose2d_backward, reference.conv_transpose2d,
                reference.conv_transpose2d_backward, lambda F, *t, **p: F.conv_transpose2d(*t, **p),
                ("input", "weight", "bias"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return self_check_op(CHECK, CHECK_CONFIGS, dtypes, backends, rng, torch_module)


# (label, batch, in channels, out channels, kernel, stride, padding, input size)
DECODERS = [
    ("U-Net up 1024->512 28", 8, 1024, 512, 2, 2, 0, 28),
    ("U-Net up 512->256 56", 8, 512, 256, 2, 2, 0, 56),
    ("U-Net up 256->128 112", 8, 256, 128, 2, 2, 0, 112),
    ("U-Net up 128->64 224", 8, 128, 64, 2, 2, 0, 224),
    ("DCGAN 1024->512 4", 64, 1024, 512, 4, 2, 1, 4),
    ("DCGAN 512->256 8", 64, 512, 256, 4, 2, 1, 8),
    ("DCGAN 256->128 16", 64, 256, 128, 4, 2, 1, 16),
    ("DCGAN 128->3 32", 64, 128, 3, 4, 2, 1, 32),
]
QUICK = ("U-Net up 512->256 56", "DCGAN 256->128 16")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    return [_case(layer, dtype, pass_, torch_module) for layer in timed_layers(DECODERS, quick, QUICK)
            for dtype in timed_dtypes(dtypes, torch_module) for pass_ in FWD_BWD]


def _case(layer, dtype, pass_, torch) -> BenchCase:
    label, batch, cin, cout, k, stride, pad, size = layer
    out = (size - 1) * stride - 2 * pad + k
    shapes = ((batch, cin, size, size), (cin, cout, k, k), (batch, cout, out, out))
    flops = 2.0 * batch * cin * size * size * cout * k * k  # every input pixel meets every tap and out channel
    backward = pass_ == "fwd+bwd"
    traffic = tensor_bytes(shapes, dtype) * (3 if backward else 1)  # input, weight, output (read or written)
    shapes = shapes if backward else shapes[:2]
    fan_in = shapes[1][0] * shapes[1][2] * shapes[1][3]  # input channels x taps reaching an output
    make_inputs = random_inputs(shapes, dtype, backward, (1.0, fan_in**-0.5, 1.0), torch)

    def by_algorithm(algorithm):
        def run(x, w, gy=None):
            cuconv.conv_transpose2d(x, w, None, stride, pad, algorithm=algorithm)
            if backward:
                cuconv.conv_transpose2d_backward(gy, x, w, None, stride, pad, wrt=("input", "weight"),
                                                 algorithm=algorithm)
        return run

    def run_torch(x, w, gy=None):
        y = torch.nn.functional.conv_transpose2d(x, w, None, stride, pad)
        if backward:
            torch.autograd.grad(y, (x, w), gy)

    baselines = {**torch_baselines(torch, run_torch), **tensor_core_rows(dtype, by_algorithm)}
    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1), make_inputs, by_algorithm("auto"),
                     baselines, bytes_moved=traffic)
