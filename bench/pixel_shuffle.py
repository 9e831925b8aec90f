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
device-to-device copy ceiling (the cases carry `bytes_moved` and no FLOPs).
"""

from __future__ import annotations

import math

from cuconv.ops.pixel_shuffle import (pixel_shuffle, pixel_shuffle_backward, pixel_unshuffle,
                                      pixel_unshuffle_backward)
from cuconv.reference import pixel_shuffle as reference

from .harness import (FWD_BWD, HOST_DTYPES, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes,
                      timed_layers)

NAME = "pixel_shuffle"
OPS = ("pixel_shuffle", "pixel_unshuffle")  # the public ops it checks and times

# --- self-check: small odd shapes, 3-D to 5-D, every factor up to 4; exact (tolerance 0) ---

CHECKS = {
    "shuffle": OpCheck(NAME, pixel_shuffle, pixel_shuffle_backward,
                       lambda x, upscale_factor: reference.pixel_shuffle(x, upscale_factor),
                       lambda gy, x, upscale_factor: reference.pixel_shuffle_backward(gy, x, upscale_factor),
                       None, ("input",), exact=True),
    "unshuffle": OpCheck("pixel_unshuffle", pixel_unshuffle, pixel_unshuffle_backward,
                         lambda x, downscale_factor: reference.pixel_unshuffle(x, downscale_factor),
                         lambda gy, x, downscale_factor: reference.pixel_unshuffle_backward(gy, x, downscale_factor),
                         None, ("input",), exact=True),
}
# (label, (input shape,), factor) per direction
CHECK_CONFIGS = {
    "shuffle": [("r1 (2,3,5,7)", ((2, 3, 5, 7),), 1), ("r2 (2,12,5,7)", ((2, 12, 5, 7),), 2),
                ("r3 3-D (18,4,3)", ((18, 4, 3),), 3), ("r4 (1,16,3,5)", ((1, 16, 3, 5),), 4)],
    "unshuffle": [("r2 (2,3,10,14)", ((2, 3, 10, 14),), 2), ("r3 5-D (2,2,1,9,6)", ((2, 2, 1, 9, 6),), 3)],
}
FACTOR = {"shuffle": "upscale_factor", "unshuffle": "downscale_factor"}


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return [row for direction, spec in CHECKS.items()
            for row in self_check_op(spec, [(label, shapes, {FACTOR[direction]: r})
                                            for label, shapes, r in CHECK_CONFIGS[direction]],
                                     dtypes, backends, rng, torch_module)]


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


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """Forward and forward+backward cases; the baseline needs torch (CuPy arrays otherwise)."""
    return [_case(layer, dtype, pass_, torch_module) for layer in timed_layers(SR_SHAPES, quick, QUICK)
            for dtype in timed_dtypes(dtypes, torch_module) for pass_ in FWD_BWD]


def _case(layer, dtype, pass_, torch) -> BenchCase:
    label, direction, c, r, h, w = layer
    lo_shape, hi_shape = (BATCH, c * r * r, h, w), (BATCH, c, h * r, w * r)
    in_shape, out_shape = (lo_shape, hi_shape) if direction == "shuffle" else (hi_shape, lo_shape)
    backward = pass_ == "fwd+bwd"
    forward_op, backward_op = CHECKS[direction].forward, CHECKS[direction].backward
    shapes = (in_shape, out_shape) if backward else (in_shape,)
    itemsize = HOST_DTYPES[dtype].itemsize
    bytes_moved = 2 * math.prod(in_shape) * itemsize * (2 if backward else 1)

    make_inputs = random_inputs(shapes, dtype, backward, (1.0, 1.0), torch)

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
    return BenchCase(NAME, label, dtype, pass_, 0.0, make_inputs, run_cuconv, baselines,
                     bytes_moved=float(bytes_moved))
