"""subpixel_conv2d suite: the self-check against cuconv.reference, and ESPCN's output
layer (3x3 conv to 3*r*r channels, then the shuffle to a 1080p RGB image) timed
against torch conv2d + pixel_shuffle."""

from __future__ import annotations

import cuconv
from cuconv.reference import subpixel as reference

from .harness import (FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, tensor_bytes,
                      tensor_core_rows, timed_dtypes, torch_baselines)

NAME = "subpixel_conv2d"

CHECK_CONFIGS = [
    ("r2 3x3 p1 bias", ((2, 4, 6, 7), (12, 4, 3, 3), (12,)), dict(upscale_factor=2, padding=1)),
    ("r3 1x1", ((1, 5, 5, 4), (18, 5, 1, 1), None), dict(upscale_factor=3)),
    ("r2 3x3 s2 groups=2 bias", ((2, 4, 9, 8), (8, 2, 3, 3), (8,)), dict(upscale_factor=2, stride=2, groups=2)),
]


def _torch_subpixel(F, x, w, b, upscale_factor, **params):
    return F.pixel_shuffle(F.conv2d(x, w, b, **params), upscale_factor)


CHECK = OpCheck(NAME, cuconv.subpixel_conv2d, cuconv.subpixel_conv2d_backward, reference.subpixel_conv2d,
                reference.subpixel_conv2d_backward, _torch_subpixel, ("input", "weight", "bias"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return self_check_op(CHECK, CHECK_CONFIGS, dtypes, backends, rng, torch_module)


BATCH, FEATURES = 4, 32  # ESPCN's last hidden layer has 32 feature maps


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    cases = []
    for r in (2, 3, 4):
        if quick and r != 3:
            continue
        h, w = 1080 // r, 1920 // r
        shapes = ((BATCH, FEATURES, h, w), (3 * r * r, FEATURES, 3, 3), (BATCH, 3, h * r, w * r))
        flops = 2.0 * BATCH * 3 * r * r * h * w * FEATURES * 9
        for dtype in timed_dtypes(dtypes, torch_module):
            for pass_ in FWD_BWD:
                cases.append(_case(f"ESPCN x{r} 1080p", r, dtype, pass_, shapes, flops, torch_module))
    return cases


def _case(label, r, dtype, pass_, shapes, flops, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    traffic = tensor_bytes(shapes, dtype) * (3 if backward else 1)  # input, weight, output (read or written)
    shapes = shapes if backward else shapes[:2]
    make_inputs = random_inputs(shapes, dtype, backward, (1.0, (FEATURES * 9) ** -0.5, 1.0), torch)

    def by_algorithm(algorithm):
        def run(x, w, gy=None):
            cuconv.subpixel_conv2d(x, w, None, r, padding=1, algorithm=algorithm)
            if backward:
                cuconv.subpixel_conv2d_backward(gy, x, w, None, r, padding=1, wrt=("input", "weight"), algorithm=algorithm)
        return run

    def run_torch(x, w, gy=None):
        y = _torch_subpixel(torch.nn.functional, x, w, None, r, padding=1)
        if backward:
            torch.autograd.grad(y, (x, w), gy)

    baselines = {**torch_baselines(torch, run_torch), **tensor_core_rows(dtype, by_algorithm)}
    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1), make_inputs, by_algorithm("auto"),
                     baselines, bytes_moved=traffic)
