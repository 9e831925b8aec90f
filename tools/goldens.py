"""Bitwise golden outputs of every public op, for refactors that must not change a bit.

    python3 tools/goldens.py save DIR      # before the change
    python3 tools/goldens.py compare DIR   # after it: lists every output that differs

Every op runs on the interpret backend in float16, bfloat16, float32 and float64, by
every algorithm that supports the case (the implicit-GEMM kernels also forced onto their
64-bit-index twins), forward and backward with every gradient requested. Inputs come
from a fixed seed, so two runs of the same code write the same bytes.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

import cuconv
from cuconv import _registry
from cuconv.ops import conv2d_igemm

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
COMPLEX = {"float16": np.complex64, "bfloat16": np.complex64, "float32": np.complex64, "float64": np.complex128}
ALGORITHMS = ("auto", "direct", "depthwise", "fft", "implicit_gemm", "implicit_gemm_tf32")

# op -> [(label, array shapes by name (None: absent), params)]
CASES = {
    "conv2d": [
        ("grouped", dict(input=(2, 4, 9, 8), weight=(6, 2, 3, 3), bias=(6,)), dict(stride=2, padding=1, groups=2)),
        ("depthwise", dict(input=(2, 4, 9, 11), weight=(8, 1, 5, 3), bias=(8,)), dict(padding=(2, 1), groups=4)),
        ("large", dict(input=(1, 3, 18, 17), weight=(4, 3, 15, 15), bias=None), dict(padding=7)),
        ("dilated", dict(input=(2, 5, 10, 9), weight=(7, 5, 3, 2), bias=(7,)), dict(dilation=(2, 1), padding="same")),
    ],
    "conv_transpose2d": [
        ("strided", dict(input=(2, 4, 5, 5), weight=(4, 3, 3, 3), bias=(3,)), dict(stride=2, padding=1, output_padding=1)),
        ("grouped", dict(input=(1, 6, 4, 6), weight=(6, 2, 2, 3), bias=None), dict(stride=(1, 2), groups=3, dilation=2)),
    ],
    "subpixel_conv2d": [("r2", dict(input=(1, 3, 6, 6), weight=(12, 3, 3, 3), bias=(12,)), dict(upscale_factor=2, padding=1))],
    "depthwise_separable_conv2d": [
        ("m2", dict(input=(2, 3, 8, 8), depthwise_weight=(6, 1, 3, 3), pointwise_weight=(5, 6, 1, 1),
                    depthwise_bias=(6,), pointwise_bias=(5,)), dict(stride=2, padding=1))],
    "spatial_separable_conv2d": [
        ("g2", dict(input=(2, 4, 9, 9), weight_v=(6, 2, 3, 1), weight_h=(4, 3, 1, 5), bias=(4,)),
         dict(padding=(1, 2), groups=2))],
    "pixel_shuffle": [("r2", dict(input=(2, 12, 3, 4)), dict(upscale_factor=2))],
    "pixel_unshuffle": [("r2", dict(input=(2, 3, 6, 8)), dict(downscale_factor=2))],
    "deform_conv2d": [
        ("v2", dict(input=(2, 4, 7, 6), offset=(2, 18, 7, 6), weight=(6, 2, 3, 3), bias=(6,), mask=(2, 9, 7, 6)),
         dict(padding=1)),
        ("v1", dict(input=(1, 4, 8, 7), offset=(1, 36, 4, 4), weight=(4, 4, 3, 3), bias=None, mask=None),
         dict(stride=2, padding=1)),
    ],
    "involution2d": [("s2", dict(input=(2, 4, 8, 8), kernel=(2, 2, 3, 3, 4, 4)), dict(stride=2, padding=1)),
                     ("s1", dict(input=(1, 6, 9, 7), kernel=(1, 3, 5, 5, 9, 7)), dict(padding=2))],
    "dynamic_conv2d": [("g2", dict(input=(2, 4, 7, 7), weight=(3, 6, 2, 3, 3), attention=(2, 3), bias=(3, 6)),
                        dict(padding=1, groups=2))],
    "odconv2d": [("s2", dict(input=(2, 4, 7, 7), weight=(3, 6, 4, 3, 3), kernel_attention=(2, 3),
                             spatial_attention=(2, 3, 3), channel_attention=(2, 4), filter_attention=(2, 6)),
                  dict(stride=2))],
    "warehouse_conv2d": [("same", dict(input=(2, 4, 7, 7), cells=(3, 3, 2, 3, 3), attention=(2, 4, 3)),
                          dict(padding="same", kernel_shape=(6, 4, 3, 3)))],
    "spectral_filter2d": [("shared", dict(input=(2, 3, 8, 7), filter=(1, 3, 8, 4)), {})],
}


def _arrays(op: str, shapes: dict, dtype: str, rng) -> dict:
    complex_args = _registry.OPS[op].complex_arrays
    made = {}
    for name, shape in shapes.items():
        if shape is None:
            made[name] = None
        elif name in complex_args:
            made[name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(COMPLEX[dtype])
        else:
            made[name] = rng.standard_normal(shape).astype(DTYPES[dtype])
    return made


def _bytes(value) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(np.asarray(value)).tobytes(), dtype=np.uint8)


def _cases() -> dict:
    """CASES, and the registered examples of any op CASES does not name."""
    extra = {op: [(f"example{i}", e.shapes, e.params) for i, e in enumerate(opdef.examples)]
             for op, opdef in _registry.OPS.items() if op not in CASES}
    return {**CASES, **extra}


def outputs() -> dict[str, np.ndarray]:
    """name -> the raw bytes of one output, for every op, case, dtype and algorithm."""
    result = {}
    for op, cases in _cases().items():
        forward, backward = getattr(cuconv, op), getattr(cuconv, op + "_backward")
        algorithms = ALGORITHMS if "algorithm" in inspect.signature(forward).parameters else (None,)
        for label, shapes, params in cases:
            for dtype in DTYPES:
                arrays = _arrays(op, shapes, dtype, np.random.default_rng(0))
                for algorithm in algorithms:
                    extra = {} if algorithm is None else {"algorithm": algorithm}
                    try:
                        y = forward(**arrays, **params, **extra)
                    except ValueError as error:
                        if "algorithm" in str(error):
                            continue
                        raise
                    key = f"{op}/{label}/{dtype}/{algorithm}"
                    result[key + "/forward"] = _bytes(y)
                    gy = np.random.default_rng(1).standard_normal(np.shape(y)).astype(DTYPES[dtype])
                    grads = backward(gy, **arrays, **params, **extra)
                    for name, g in zip(_registry.OPS[op].arrays, grads):
                        if g is not None:
                            result[f"{key}/grad_{name}"] = _bytes(g)
    return result


def all_outputs() -> dict[str, np.ndarray]:
    """outputs(), then again with the implicit-GEMM kernels on their 64-bit-index twins."""
    result = outputs()
    safe = conv2d_igemm.index32_safe
    conv2d_igemm.index32_safe = lambda *args, **kwargs: False
    try:
        result.update({"index64:" + k: v for k, v in outputs().items() if "implicit_gemm" in k})
    finally:
        conv2d_igemm.index32_safe = safe
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__)
        return 2
    directory = Path(argv[1])
    got = all_outputs()
    if argv[0] == "save":
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "goldens.npz", **{k.replace("/", "|"): v for k, v in got.items()})
        print(f"saved {len(got)} outputs to {directory / 'goldens.npz'}")
        return 0
    saved = {k.replace("|", "/"): v for k, v in np.load(directory / "goldens.npz").items()}
    missing = sorted(set(saved) - set(got))
    added = sorted(set(got) - set(saved))
    differ = sorted(k for k in set(saved) & set(got) if not np.array_equal(saved[k], got[k]))
    for k in missing:
        print("missing", k)
    for k in added:
        print("new", k)
    for k in differ:
        print("differs", k)
    print(f"{len(saved)} saved, {len(got)} now: {len(differ)} differ, {len(missing)} missing, {len(added)} new")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
