"""cuconv._shapes: every op's output shape from shapes alone equals the shape of the
op's real result, and a bad shape raises the op's own error."""

import numpy as np
import pytest

import cuconv
from cuconv import _shapes

# op -> (array shapes by name (None: absent), params)
CASES = {
    "conv2d": (dict(input=(2, 4, 9, 8), weight=(6, 2, 3, 3), bias=(6,)), dict(stride=2, padding=1, groups=2)),
    "conv_transpose2d": (dict(input=(2, 4, 5, 5), weight=(4, 3, 3, 3), bias=None),
                         dict(stride=2, padding=1, output_padding=1)),
    "subpixel_conv2d": (dict(input=(1, 3, 6, 6), weight=(12, 3, 3, 3), bias=(12,)), dict(upscale_factor=2, padding=1)),
    "depthwise_separable_conv2d": (dict(input=(2, 3, 8, 8), depthwise_weight=(6, 1, 3, 3),
                                        pointwise_weight=(5, 6, 1, 1), depthwise_bias=None, pointwise_bias=(5,)),
                                   dict(stride=2, padding=1)),
    "spatial_separable_conv2d": (dict(input=(2, 4, 9, 9), weight_v=(6, 2, 3, 1), weight_h=(4, 3, 1, 5), bias=None),
                                 dict(padding=(1, 2), groups=2)),
    "pixel_shuffle": (dict(input=(2, 12, 3, 4)), dict(upscale_factor=2)),
    "pixel_unshuffle": (dict(input=(2, 3, 6, 8)), dict(downscale_factor=2)),
    "deform_conv2d": (dict(input=(2, 4, 7, 6), offset=(2, 18, 7, 6), weight=(6, 2, 3, 3), bias=None,
                           mask=(2, 9, 7, 6)), dict(padding=1)),
    "involution2d": (dict(input=(2, 4, 8, 8), kernel=(2, 2, 3, 3, 4, 4)), dict(stride=2, padding=1)),
    "dynamic_conv2d": (dict(input=(2, 4, 7, 7), weight=(3, 6, 2, 3, 3), attention=(2, 3), bias=(3, 6)),
                       dict(padding=1, groups=2)),
    "odconv2d": (dict(input=(2, 4, 7, 7), weight=(3, 6, 4, 3, 3), kernel_attention=(2, 3), spatial_attention=(2, 3, 3),
                      channel_attention=(2, 4), filter_attention=(2, 6)), dict(stride=2)),
    "warehouse_conv2d": (dict(input=(2, 4, 7, 7), cells=(3, 3, 2, 3, 3), attention=(2, 4, 3)),
                         dict(padding="same", kernel_shape=(6, 4, 3, 3))),
    "spectral_filter2d": (dict(input=(2, 3, 8, 7), filter=(1, 3, 8, 4)), {}),
}


def _arrays(op, shapes, rng):
    made = {}
    for name, shape in shapes.items():
        if shape is not None:
            made[name] = rng.standard_normal(shape)
            if name in _shapes.COMPLEX_ARGS.get(op, ()):
                made[name] = made[name] + 1j * rng.standard_normal(shape)
    return made


def test_every_op_is_covered():
    assert set(CASES) == set(_shapes.ARRAY_ARGS)
    exported = {name for name in cuconv.__all__ if not name.endswith("_backward")}
    assert set(_shapes.ARRAY_ARGS) == exported - {"conv_output_size", "__version__"}


@pytest.mark.parametrize("op", sorted(CASES))
def test_output_shape_matches_the_op(op):
    shapes, params = CASES[op]
    arrays = _arrays(op, shapes, np.random.default_rng(0))
    keyword = {n: arrays.pop(n, None) for n in _shapes.KEYWORD_ARRAYS.get(op, ())}
    positional = [arrays.get(n) for n in _shapes.ARRAY_ARGS[op] if n not in keyword]
    result = getattr(cuconv, op)(*positional, **keyword, **params)
    assert _shapes.output_shape(op, shapes, **params) == result.shape


def test_bad_shape_raises_the_ops_error():
    with pytest.raises(ValueError, match=r"input has 4 channels but weight expects"):
        _shapes.output_shape("conv2d", dict(input=(2, 4, 9, 8), weight=(6, 3, 3, 3)))
    with pytest.raises(KeyError, match="no array arguments"):
        _shapes.output_shape("conv2d", dict(image=(2, 4, 9, 8)))
