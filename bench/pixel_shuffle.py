"""pixel_shuffle suite: the self-check against cuconv.reference (exact: a permutation
rounds nothing), and super-resolution shapes timed against torch's pixel_shuffle /
pixel_unshuffle.

Shapes (batch 16, as in video/SR inference and ESPCN/EDSR training):
  ESPCN (Shi et al. 2016, real-time 1080p video SR): the last conv emits C*r*r
    channels at low resolution and pixel_shuffle lifts them to a 1080x1920 frame;
    x2 / x3 / x4 from 540x960 / 360x640 / 270x480, RGB (C = 3) and the paper's
    luminance-only variant (Y, C = 1).
  EDSR x2 upsampler (Lim et al. 2017, training on 48x48 LR patches): 256 -> 64
    feature channels, 48x48 -> 96x96: many channels, small planes.
  Real-ESRGAN x2 (Wang et al. 2021): pixel_unshuffle of the 1080p RGB input by 2
    before the x4 body, the inverse rearrangement.

Throughput is bytes moved (every element read once and written once per pass:
2 * numel * itemsize for fwd, twice that for fwd+bwd), to be compared with the
device-to-device copy ceiling. The harness reports FLOP/s only today, so the cases
carry `bytes_moved` and `flops = 0` (see BandwidthCase below).
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np

from cuconv.ops.pixel_shuffle import (pixel_shuffle, pixel_shuffle_backward, pixel_unshuffle,
                                      pixel_unshuffle_backward)

from .harness import HOST_DTYPES, BenchCase, CheckRow, rel_error, to_backend

# By full name: once cuconv.reference exports the functions, the attribute
# cuconv.reference.pixel_shuffle is the function, not this module.
reference = importlib.import_module("cuconv.reference.pixel_shuffle")

NAME = "pixel_shuffle"

# The two directions: forward op, its backward, the reference's forward and backward.
OPS = {
    "shuffle": (pixel_shuffle, pixel_shuffle_backward, reference.pixel_shuffle, reference.pixel_shuffle_backward),
    "unshuffle": (pixel_unshuffle, pixel_unshuffle_backward, reference.pixel_unshuffle,
                  reference.pixel_unshuffle_backward),
}

# --- self-check: small odd shapes, 3-D to 5-D, every factor up to 4 ---

# (label, direction, input shape, factor)
CHECK_CONFIGS = [
    ("shuffle r1 (2,3,5,7)", "shuffle", (2, 3, 5, 7), 1),
    ("shuffle r2 (2,12,5,7)", "shuffle", (2, 12, 5, 7), 2),
    ("shuffle r3 3-D (18,4,3)", "shuffle", (18, 4, 3), 3),
    ("shuffle r4 (1,16,3,5)", "shuffle", (1, 16, 3, 5), 4),
    ("unshuffle r2 (2,3,10,14)", "unshuffle", (2, 3, 10, 14), 2),
    ("unshuffle r3 5-D (2,2,1,9,6)", "unshuffle", (2, 2, 1, 9, 6), 3),
]
PASSES = ("fwd", "bwd input")


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    """Every result must equal the float64 reference exactly (tolerance 0, "exact")."""
    rows = []
    for label, direction, shape, r in CHECK_CONFIGS:
        forward, backward, ref_forward, ref_backward = OPS[direction]
        for dtype in dtypes:
            # Inputs drawn once and rounded to `dtype`: the reference sees those exact values,
            # and a permutation of them is exactly representable in `dtype` again.
            x = rng.standard_normal(shape).astype(HOST_DTYPES[dtype])
            y_ref = ref_forward(x.astype(np.float64), r)
            gy = rng.standard_normal(y_ref.shape).astype(HOST_DTYPES[dtype])
            (gx_ref,) = ref_backward(gy.astype(np.float64), x.astype(np.float64), r)
            for backend in backends:
                xa = to_backend(x, dtype, backend, torch_module)
                gya = to_backend(gy, dtype, backend, torch_module)
                if xa is None:
                    continue  # bfloat16 on CuPy
                y = forward(xa, r)
                (gx,) = backward(gya, xa, r)
                for pass_, got, ref in zip(PASSES, (y, gx), (y_ref, gx_ref)):
                    rows.append(CheckRow(NAME, pass_, dtype, label, backend, rel_error(got, ref), 0.0, "exact"))
    return rows


# --- benchmark ---

BATCH = 16
# (label, direction, C on the high-resolution side, factor, low-resolution height, width)
SR_SHAPES = [
    ("ESPCN x2 RGB 540x960->1080p", "shuffle", 3, 2, 540, 960),
    ("ESPCN x3 RGB 360x640->1080p", "shuffle", 3, 3, 360, 640),
    ("ESPCN x4 RGB 270x480->1080p", "shuffle", 3, 4, 270, 480),
    ("ESPCN x3 Y 360x640->1080p", "shuffle", 1, 3, 360, 640),
    ("EDSR x2 256->64 48x48", "shuffle", 64, 2, 48, 48),
    ("Real-ESRGAN unshuffle x2 1080p", "unshuffle", 3, 2, 540, 960),
]
QUICK = ("ESPCN x3 RGB 360x640->1080p", "Real-ESRGAN unshuffle x2 1080p")

# Bytes moved per case. harness.BenchCase has no such field yet; where it lacks one this
# subclass carries it (run_case ignores it; flops = 0 keeps the FLOP columns at 0). Once
# BenchCase gains `bytes_moved`, BenchCase itself is used.
if "bytes_moved" in {f.name for f in dataclasses.fields(BenchCase)}:
    BandwidthCase = BenchCase
else:

    @dataclasses.dataclass
    class BandwidthCase(BenchCase):
        bytes_moved: float = 0.0  # read + write, in bytes, one call of `cuconv`


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """Forward and forward+backward cases; the baseline needs torch (CuPy arrays otherwise)."""
    cases = []
    for label, direction, c, r, h, w in SR_SHAPES:
        if quick and label not in QUICK:
            continue
        lo_shape, hi_shape = (BATCH, c * r * r, h, w), (BATCH, c, h * r, w * r)
        in_shape, out_shape = (lo_shape, hi_shape) if direction == "shuffle" else (hi_shape, lo_shape)
        for dtype in dtypes:
            if torch_module is None and dtype == "bfloat16":
                continue  # CuPy has no bfloat16
            for pass_ in ("fwd", "fwd+bwd"):
                cases.append(_case(label, direction, dtype, pass_, r, in_shape, out_shape, torch_module))
    return cases


def _case(label, direction, dtype, pass_, r, in_shape, out_shape, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    forward_op, backward_op = OPS[direction][:2]
    shapes = (in_shape, out_shape) if backward else (in_shape,)
    itemsize = HOST_DTYPES[dtype].itemsize
    bytes_moved = 2 * math.prod(in_shape) * itemsize * (2 if backward else 1)

    def make_inputs():
        if torch is not None:
            return tuple(torch.randn(s, device="cuda", dtype=getattr(torch, dtype)).requires_grad_(backward)
                         for s in shapes)
        import cupy

        return tuple(cupy.random.standard_normal(s, dtype=cupy.float32).astype(dtype) for s in shapes)

    def run_cuconv(x, gy=None):
        forward_op(x, r)
        if backward:
            backward_op(gy, x, r)

    baselines = {}
    if torch is not None:
        torch_op = getattr(torch.nn.functional, "pixel_" + direction)

        def run_torch(x, gy=None):
            y = torch_op(x, r)
            if backward:
                torch.autograd.grad(y, (x,), gy)

        baselines = {"torch": (lambda s: s, run_torch)}
    return BandwidthCase(NAME, label, dtype, pass_, 0.0, make_inputs, run_cuconv, baselines,
                         bytes_moved=float(bytes_moved))
