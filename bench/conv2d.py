"""conv2d suite: the self-check against cuconv.reference, and the ResNet-50 layer set
plus ConvNeXt 7x7 and RepLKNet 31x31 depthwise layers timed against torch / cuDNN (NCHW
and channels_last)."""

from __future__ import annotations

import dataclasses
import functools

import cuconv
from cuconv.ops.conv2d import CONV2D, conv_geometry
from cuconv.reference import conv2d as reference

from .harness import (BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, tensor_bytes, timed_dtypes,
                      timed_layers, torch_baselines)

NAME = "conv2d"

# --- self-check: small odd shapes that cover every parameter ---

# (label, (input, weight, bias) shapes, conv2d keyword parameters)
CHECK_CONFIGS = [
    ("3x3 s1 p1 bias", ((2, 5, 9, 11), (7, 5, 3, 3), (7,)), dict(stride=1, padding=1)),
    ("3x3 s(2,1) p(0,1)", ((2, 4, 10, 9), (6, 4, 3, 3), None), dict(stride=(2, 1), padding=(0, 1))),
    ("2x3 same d(1,2) bias", ((1, 3, 8, 9), (5, 3, 2, 3), (5,)), dict(padding="same", dilation=(1, 2))),
    ("3x3 valid d2", ((2, 3, 11, 10), (4, 3, 3, 3), None), dict(padding="valid", dilation=2)),
    ("3x3 groups=3 p(1,0) bias", ((2, 6, 7, 8), (9, 2, 3, 3), (9,)), dict(padding=(1, 0), groups=3)),
    ("5x5 depthwise s2 p2 bias", ((1, 8, 13, 11), (8, 1, 5, 5), (8,)), dict(stride=2, padding=2, groups=8)),
    ("1x1 bias", ((3, 10, 5, 7), (12, 10, 1, 1), (12,)), {}),
    ("7x7 s2 p3 (stem-like)", ((1, 3, 17, 15), (8, 3, 7, 7), None), dict(stride=2, padding=3)),
]
CHECK = OpCheck(NAME, cuconv.conv2d, cuconv.conv2d_backward, reference.conv2d, reference.conv2d_backward,
                lambda F, *t, **p: F.conv2d(*t, **p), ("input", "weight", "bias"))


def _check_by(algorithm: str) -> OpCheck:
    return dataclasses.replace(CHECK, name=f"{NAME} {algorithm}",
                               forward=functools.partial(cuconv.conv2d, algorithm=algorithm),
                               backward=functools.partial(cuconv.conv2d_backward, algorithm=algorithm))


# The fast paths checked by name, before any of them is timed: every depthwise config
# through 'depthwise'; every config through the tensor-core kernels in the dtypes they
# take (a stride-1 depthwise one runs depthwise_tc.cu).
BY_ALGORITHM = (
    (_check_by("depthwise"), [c for c in CHECK_CONFIGS if c[2].get("groups", 1) == c[1][0][1]],
     ("float16", "bfloat16", "float32", "float64")),
    (_check_by("implicit_gemm"), CHECK_CONFIGS + [("7x7 depthwise same", ((1, 4, 12, 11), (4, 1, 7, 7), (4,)),
                                                   dict(padding="same", groups=4))], ("float16", "bfloat16")),
)


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    rows = self_check_op(CHECK, CHECK_CONFIGS, dtypes, backends, rng, torch_module)
    for check, configs, supported in BY_ALGORITHM:
        wanted = [d for d in dtypes if d in supported]
        if wanted:
            rows += self_check_op(check, configs, wanted, backends, rng, torch_module)
    return rows


# --- benchmark: the distinct convolutions of ResNet-50 (torchvision v1.5: stride on the 3x3) ---

BATCH = 32
# (label, in channels, out channels, kernel, stride, input height = width); padding = kernel // 2
RESNET50 = [
    ("stem 7x7/2 3->64 224", 3, 64, 7, 2, 224),
    ("1x1 64->64 56", 64, 64, 1, 1, 56),
    ("3x3 64->64 56", 64, 64, 3, 1, 56),
    ("1x1 64->256 56", 64, 256, 1, 1, 56),
    ("1x1 256->64 56", 256, 64, 1, 1, 56),
    ("1x1 256->128 56", 256, 128, 1, 1, 56),
    ("3x3/2 128->128 56", 128, 128, 3, 2, 56),
    ("1x1/2 256->512 56", 256, 512, 1, 2, 56),
    ("3x3 128->128 28", 128, 128, 3, 1, 28),
    ("1x1 128->512 28", 128, 512, 1, 1, 28),
    ("1x1 512->128 28", 512, 128, 1, 1, 28),
    ("1x1 512->256 28", 512, 256, 1, 1, 28),
    ("3x3/2 256->256 28", 256, 256, 3, 2, 28),
    ("1x1/2 512->1024 28", 512, 1024, 1, 2, 28),
    ("3x3 256->256 14", 256, 256, 3, 1, 14),
    ("1x1 256->1024 14", 256, 1024, 1, 1, 14),
    ("1x1 1024->256 14", 1024, 256, 1, 1, 14),
    ("1x1 1024->512 14", 1024, 512, 1, 1, 14),
    ("3x3/2 512->512 14", 512, 512, 3, 2, 14),
    ("1x1/2 1024->2048 14", 1024, 2048, 1, 2, 14),
    ("3x3 512->512 7", 512, 512, 3, 1, 7),
    ("1x1 512->2048 7", 512, 2048, 1, 1, 7),
    ("1x1 2048->512 7", 2048, 512, 1, 1, 7),
]
# Depthwise layers (groups = channels, stride 1): (label, channels, kernel, input size).
# ConvNeXt-T's 7x7 (96 channels at 56x56) and RepLKNet-31B's 31x31 (128 at 56x56) layers,
# the channels doubling as the size halves over four stages.
DEPTHWISE = [(f"{net} dw{k}x{k} {c0 << i} {56 >> i}", c0 << i, k, 56 >> i)
             for net, k, c0 in (("ConvNeXt", 7, 96), ("RepLKNet", 31, 128)) for i in range(4)]
QUICK = ("stem 7x7/2 3->64 224", "3x3 64->64 56", "1x1 256->64 56", "3x3 256->256 14", "ConvNeXt dw7x7 96 56",
         "RepLKNet dw31x31 512 14")


def layers():
    """Every timed layer as (label, in channels, out channels, kernel, stride, size, groups)."""
    return ([(*layer, 1) for layer in RESNET50]
            + [(label, c, c, k, 1, size, c) for label, c, k, size in DEPTHWISE])


# Passes timed per layer; --quick keeps the first and last.
PASSES = ("fwd", "dgrad", "wgrad", "fwd+bwd")
QUICK_PASSES = ("fwd", "fwd+bwd")
# Gradients each pass asks for (fwd asks for none).
_WRT = {"fwd": (), "dgrad": ("input",), "wgrad": ("weight",), "fwd+bwd": ("input", "weight")}


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """fwd, dgrad, wgrad and fwd+bwd cases; baselines need torch (CuPy arrays otherwise)."""
    cases = []
    for label, cin, cout, k, stride, size, groups in timed_layers(layers(), quick, QUICK):
        pad = k // 2
        out = cuconv.conv_output_size(size, k, stride, pad)
        shapes = ((BATCH, cin, size, size), (cout, cin // groups, k, k), (BATCH, cout, out, out))
        flops = 2.0 * BATCH * cout * out * out * (cin // groups) * k * k
        for dtype in timed_dtypes(dtypes, torch_module):
            for pass_ in QUICK_PASSES if quick else PASSES:
                cases.append(_case(label, dtype, pass_, shapes, stride, pad, groups, flops, torch_module))
    return cases


def _supported_algorithms(shapes, stride, pad, groups, dtype) -> list[str]:
    """Every conv2d algorithm that runs this layer in dtype (each is timed by name)."""
    geom = conv_geometry("bench", shapes[0], shapes[1], None, stride, pad, 1, groups)
    return [a for a in CONV2D.names() if CONV2D[a].why_not(geom, dtype) is None]


def _case(label, dtype, pass_, shapes, stride, pad, groups, flops, torch) -> BenchCase:
    """shapes: (input, weight, output); the output shape is an input set member (the
    incoming gradient) except for fwd. 'cuconv' is algorithm='auto' (untuned unless
    CUCONV_AUTOTUNE=1); every supported algorithm is also timed by name in the same run."""
    wrt = _WRT[pass_]
    with_forward = pass_ in ("fwd", "fwd+bwd")
    # compulsory traffic: x and w read, y written; each gradient reads gy and one operand
    # and writes its own result
    traffic = tensor_bytes(shapes, dtype) * (1 if with_forward else 0) + tensor_bytes(shapes, dtype) * len(wrt)
    shapes = shapes if wrt else shapes[:2]
    fan_in = shapes[1][1] * shapes[1][2] * shapes[1][3]
    # unit-scale activations and gradients, Kaiming-like weights
    make_inputs = random_inputs(shapes, dtype, bool(wrt), (1.0, fan_in**-0.5, 1.0), torch)

    def by_algorithm(algorithm):
        def run(x, w, gy=None):
            if with_forward:
                cuconv.conv2d(x, w, None, stride, pad, 1, groups, algorithm=algorithm)
            if wrt:
                cuconv.conv2d_backward(gy, x, w, None, stride, pad, 1, groups, wrt=wrt, algorithm=algorithm)
        return run

    def run_torch(x, w, gy=None):
        if with_forward:
            y = torch.nn.functional.conv2d(x, w, None, stride, pad, 1, groups)
        if pass_ == "fwd+bwd":
            torch.autograd.grad(y, (x, w), gy)
        elif wrt:  # one gradient alone: cuDNN's dgrad or wgrad
            with torch.no_grad():
                torch.ops.aten.convolution_backward(gy, x, w, None, (stride, stride), (pad, pad), (1, 1), False,
                                                    (0, 0), groups, (pass_ == "dgrad", pass_ == "wgrad", False))

    baselines = torch_baselines(torch, run_torch)
    if torch is not None and dtype == "float32":
        # The bench runs torch with TF32 off (true fp32, as cuconv's float32 algorithms);
        # cuconv's implicit_gemm_tf32 row is compared with cuDNN allowed TF32, in channels_last.
        def run_torch_tf32(*tensors):
            torch.backends.cudnn.allow_tf32 = True
            try:
                run_torch(*tensors)
            finally:
                torch.backends.cudnn.allow_tf32 = False

        baselines["torch TF32 CL"] = (baselines["torch CL"][0], run_torch_tf32)
    for algorithm in _supported_algorithms(shapes, stride, pad, groups, dtype):
        baselines[f"cuconv {algorithm}"] = (lambda s: s, by_algorithm(algorithm))
    work = flops * ((1 if with_forward else 0) + len(wrt))
    return BenchCase(NAME, label, dtype, pass_, work, make_inputs, by_algorithm("auto"), baselines,
                     bytes_moved=traffic)
