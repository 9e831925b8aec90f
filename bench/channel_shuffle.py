"""channel_shuffle suite: the self-check against cuconv.reference (exact: a permutation
rounds nothing), and ShuffleNet shapes timed against torch's channel_shuffle (NCHW and
channels_last inputs).

Shapes (batch 128, ImageNet training at 224x224): the channel shuffle after each
grouped 1x1 conv of a unit, at the channel count and resolution of its stage.
  ShuffleNet v1 1x (Zhang et al. 2018), g = 3: 240 / 480 / 960 channels at
    28x28 / 14x14 / 7x7; g = 8: 384 / 768 / 1536.
  ShuffleNet v2 (Ma et al. 2018), g = 2 (the concat of the two branches): 1.0x
    116 / 232 / 464 channels, 2.0x 244 channels at 28x28.
The 7x7 stages have short planes (49 elements): a warp's loads span two or three input
channels there, the stress case of the gather.

Throughput is bytes moved (every element read once and written once per pass:
2 * numel * itemsize for fwd, twice that for fwd+bwd), to be compared with the
device-to-device copy ceiling (the cases carry `bytes_moved` and no FLOPs).
"""

from __future__ import annotations

import math

from cuconv.ops.channel_shuffle import channel_shuffle, channel_shuffle_backward
from cuconv.reference import channel_shuffle as reference

from .harness import (FWD_BWD, HOST_DTYPES, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes,
                      timed_layers, torch_baselines)

NAME = "channel_shuffle"

# --- self-check: small odd shapes, 3-D to 5-D, groups 1 to C; exact (tolerance 0) ---

CHECK = OpCheck(NAME, channel_shuffle, channel_shuffle_backward,
                lambda x, groups: reference.channel_shuffle(x, groups),
                lambda gy, x, groups: reference.channel_shuffle_backward(gy, x, groups),
                None, ("input",), exact=True)
# (label, (input shape,), groups)
CHECK_CONFIGS = [
    ("g3 (2,15,5,7)", ((2, 15, 5, 7),), 3),
    ("g1 (2,6,3,3)", ((2, 6, 3, 3),), 1),
    ("g2 3-D (3,8,7)", ((3, 8, 7),), 2),
    ("g6 5-D (2,12,2,3,2)", ((2, 12, 2, 3, 2),), 6),
    ("g4 S=1 (5,12,1,1)", ((5, 12, 1, 1),), 4),
]


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return self_check_op(CHECK, [(label, shapes, {"groups": g}) for label, shapes, g in CHECK_CONFIGS],
                         dtypes, backends, rng, torch_module)


# --- benchmark ---

BATCH = 128
# (label, channels, groups, height, width)
SHUFFLENET_SHAPES = [
    ("ShuffleNetV1 g3 240 28x28", 240, 3, 28, 28),
    ("ShuffleNetV1 g3 480 14x14", 480, 3, 14, 14),
    ("ShuffleNetV1 g3 960 7x7", 960, 3, 7, 7),
    ("ShuffleNetV1 g8 384 28x28", 384, 8, 28, 28),
    ("ShuffleNetV1 g8 1536 7x7", 1536, 8, 7, 7),
    ("ShuffleNetV2 1.0x 116 28x28", 116, 2, 28, 28),
    ("ShuffleNetV2 1.0x 464 7x7", 464, 2, 7, 7),
    ("ShuffleNetV2 2.0x 244 28x28", 244, 2, 28, 28),
]
QUICK = ("ShuffleNetV1 g3 240 28x28", "ShuffleNetV2 1.0x 464 7x7")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """Forward and forward+backward cases; the baselines need torch (CuPy arrays otherwise)."""
    return [_case(layer, dtype, pass_, torch_module) for layer in timed_layers(SHUFFLENET_SHAPES, quick, QUICK)
            for dtype in timed_dtypes(dtypes, torch_module) for pass_ in FWD_BWD]


def _case(layer, dtype, pass_, torch) -> BenchCase:
    label, c, g, h, w = layer
    shape = (BATCH, c, h, w)
    backward = pass_ == "fwd+bwd"
    shapes = (shape, shape) if backward else (shape,)
    bytes_moved = 2 * math.prod(shape) * HOST_DTYPES[dtype].itemsize * (2 if backward else 1)

    make_inputs = random_inputs(shapes, dtype, backward, (1.0, 1.0), torch)

    def run_cuconv(x, gy=None):
        channel_shuffle(x, g)
        if backward:
            channel_shuffle_backward(gy, x, g)

    def run_torch(x, gy=None):
        y = torch.nn.functional.channel_shuffle(x, g)
        if backward:
            torch.autograd.grad(y, (x,), gy)

    return BenchCase(NAME, label, dtype, pass_, 0.0, make_inputs, run_cuconv, torch_baselines(torch, run_torch),
                     bytes_moved=float(bytes_moved))
