"""conv2d's algorithm='depthwise' (cuconv/ops/depthwise.py, kernels_cu/depthwise.cu):
forward, input and weight gradients against the float64 reference, the design §2
reduced-precision rule, determinism, the multi-tile / multi-chunk paths, the shared
memory budget and the workspace, and unsupported geometry. The op is called through
depthwise_forward / depthwise_gradients directly, with the Call and geometry built as
conv2d() / conv2d_backward() build them."""

from dataclasses import replace

import numpy as np
import pytest
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import depthwise as depthwise_module
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.depthwise import DEPTHWISE, depthwise_forward, depthwise_gradients, depthwise_supported, wgrad_chunks
from cuconv.reference import conv2d as reference
from conftest import (assert_reduced_precision, depthwise_case_arrays as case_arrays, depthwise_geometry as geometry,
                      depthwise_through, rel_err, to_backend, to_numpy)

# conv2d(..., algorithm='depthwise') and conv2d_backward(...) as conv2d() would dispatch them
dw_conv2d, dw_conv2d_backward = depthwise_through(depthwise_forward, depthwise_gradients)


# (batch, channels, multiplier, H, W, k, params, bias): every kernel size the issue names,
# multiplier 1 and 2, stride 1/2/3, int / 'same' / 'valid' padding, dilation 1/2, odd and
# rectangular sizes, planes smaller and larger than a 32x32 tile.
CASES = [
    (2, 3, 1, 9, 11, 1, dict(stride=2), True),
    (2, 3, 1, 9, 11, 3, dict(padding=1), True),
    (1, 2, 2, 37, 41, 3, dict(padding="same"), False),                  # > one tile both ways
    (2, 2, 2, 13, 10, 5, dict(stride=2, padding=2), True),
    (1, 3, 1, 12, 17, 3, dict(stride=3, padding=1, dilation=2), False),
    (1, 2, 1, 35, 33, 7, dict(padding="same", dilation=2), True),
    (2, 1, 2, 15, 14, 7, dict(stride=(2, 3), padding="valid"), True),
    (1, 2, 1, 21, 19, 9, dict(padding=4), False),
    (1, 1, 2, 23, 34, 9, dict(stride=2, padding=(4, 3), dilation=(1, 2)), True),
    (1, 2, 1, 20, 26, 13, dict(padding=6, stride=(1, 2)), True),
    (1, 1, 2, 27, 25, 13, dict(padding="same"), False),
    (1, 1, 1, 35, 33, 31, dict(padding=15), True),                       # RepLKNet size, small image
    (1, 1, 2, 31, 36, 31, dict(padding="valid", stride=(1, 2)), False),
    (1, 2, 1, 5, 6, (3, 5), dict(padding=(1, 2)), True),                 # rectangular kernel, tiny plane
]


def assert_matches_reference(backend, x, w, b, params, seed=0):
    c = x.shape[1]
    y = dw_conv2d(*(to_backend(a, backend) for a in (x, w, b)), **params)
    y_ref = reference.conv2d(x, w, b, groups=c, **params)
    assert rel_err(y, y_ref) < 1e-10
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = dw_conv2d_backward(*(to_backend(a, backend) for a in (gy, x, w, b)), **params)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, reference.conv2d_backward(gy, x, w, b, groups=c,
                                                                                            **params)):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: f"k{CASES[i][5]}-m{CASES[i][2]}")
def test_matches_reference_float64(backend, index):
    x, w, b, params = case_arrays(CASES[index], index)
    assert_matches_reference(backend, x, w, b, params, index)


def test_batch_zero_and_one(backend):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 1, 3, 3)), rng.standard_normal(4)
    x = np.zeros((0, 2, 9, 9))
    y = to_numpy(dw_conv2d(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend), stride=2))
    assert y.shape == (0, 4, 4, 4)
    gx, gw, gb = (to_numpy(g) for g in dw_conv2d_backward(
        to_backend(np.zeros((0, 4, 4, 4)), backend), to_backend(x, backend), to_backend(w, backend),
        to_backend(b, backend), stride=2))
    assert gx.shape == (0, 2, 9, 9)
    np.testing.assert_array_equal(gw, np.zeros_like(w))  # a sum over nothing, written (outputs are poisoned)
    np.testing.assert_array_equal(gb, np.zeros(4))
    assert_matches_reference(backend, rng.standard_normal((1, 2, 9, 9)), w, b, dict(stride=2))


def test_wrt_subsets():
    x, w, b, params = case_arrays(CASES[3], 3)
    gy = np.random.default_rng(2).standard_normal(reference.conv2d(x, w, b, groups=2, **params).shape)
    full = dw_conv2d_backward(gy, x, w, b, **params)
    gx, gw, gb = dw_conv2d_backward(gy, x, w, b, **params, wrt=("weight",))
    assert gx is None and gb is None
    np.testing.assert_array_equal(gw, full[1])
    gx, gw, gb = dw_conv2d_backward(gy, x, w, b, **params, wrt="input")
    assert gw is None and gb is None
    np.testing.assert_array_equal(gx, full[0])


def test_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    x = np.ascontiguousarray(rng.standard_normal((2, 11, 10, 3)).transpose(0, 3, 1, 2))[:, :, ::-1, :]
    w = rng.standard_normal((6, 1, 5, 3)).transpose(0, 1, 3, 2)
    assert not (x.flags.c_contiguous or w.flags.c_contiguous)
    assert_matches_reference("interpret", x, w, None, dict(padding=2, stride=(1, 2)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("index", [2, 6, 9])
def test_reduced_precision_within_twice_torch_error(dtype, index):
    x, w, b, params = case_arrays(CASES[index], 50 + index)
    params = dict(params, groups=x.shape[1])
    assert_reduced_precision(dw_conv2d, dw_conv2d_backward, reference.conv2d, reference.conv2d_backward,
                             lambda *t: F.conv2d(*t, **params), (x, w, b), params, dtype, index)


def small_tiles(monkeypatch, out_channels):
    """8x8 tiles, two weight-gradient chunks of several bands each, 32-thread weight-gradient
    blocks (more than 128 taps take several passes) and a 3-block grid: the multi-tile,
    multi-chunk, multi-pass and grid-stride paths at test sizes."""
    monkeypatch.setattr(depthwise_module, "_TILES", ((8, 8),))
    monkeypatch.setattr(depthwise_module, "_WGRAD_THREADS", 32)
    monkeypatch.setattr(depthwise_module, "_WGRAD_TARGET_BLOCKS", 2 * out_channels)
    monkeypatch.setattr(_common, "_MAX_GRID", 3)


@pytest.mark.parametrize("index", [1, 4, 7, 8, 9, 10])
def test_multi_tile_multi_chunk_paths(backend, index, monkeypatch):
    x, w, b, params = case_arrays(CASES[index], 200 + index)
    x = np.concatenate([x, x[::-1] * 0.5, -x])  # more images: more bands to chunk
    small_tiles(monkeypatch, w.shape[0])
    geom = geometry(x.shape, w.shape, **params)
    tiles = {kind: depthwise_module._tiles(rows, cols, depthwise_module._plan(geom, kind, 8, 48 * 1024))
             for kind, rows, cols in (("fwd", geom.out_h, geom.out_w), ("bwd_input", geom.in_h, geom.in_w))}
    assert tiles["bwd_input"] > 1 and (tiles["fwd"] > 1 or index == 4), tiles
    chunks, per_chunk = wgrad_chunks(geom, depthwise_module._plan(geom, "bwd_weight", 8, 48 * 1024))
    assert chunks == 2 and per_chunk > 1
    taps = w.shape[2] * w.shape[3]
    assert (taps > 32 * depthwise_module._TAPS_PER_THREAD) == (index in (9, 10))  # k = 13: two passes
    assert_matches_reference(backend, x, w, b, params, index)


def test_backward_is_bitwise_deterministic(monkeypatch):
    monkeypatch.setattr(depthwise_module, "_WGRAD_TARGET_BLOCKS", 16)
    x, w, b, params = case_arrays(CASES[2], 9)
    x, w = np.concatenate([x] * 3).astype(np.float32), w.astype(np.float32)
    gy = np.random.default_rng(1).standard_normal(reference.conv2d(x, w, None, groups=2, **params).shape)
    gy = gy.astype(np.float32)
    first = dw_conv2d_backward(gy, x, w, None, **params)
    second = dw_conv2d_backward(gy, x, w, None, **params)
    assert first[2] is None and second[2] is None
    for g1, g2 in zip(first[:2], second[:2]):
        assert g1.tobytes() == g2.tobytes()


def test_shared_memory_budget_and_large_kernels_supported():
    """Every odd kernel up to 31 with dilation 1 (and RepLKNet's 31 with dilation 2) fits
    48 KiB in every dtype; k = 31, dilation 1, fp32 keeps the full 32x32 tile (the
    interpret backend refuses more than 48 KiB, so the float64 runs above also prove it)."""
    for k in range(1, 32, 2):
        for dilation in (1, 2):
            geom = geometry((1, 4, 160, 160), (8, 1, k, k), padding=(k - 1) * dilation // 2, dilation=dilation)
            for dtype, acc in (("float16", 4), ("bfloat16", 4), ("float32", 4), ("float64", 8)):
                assert depthwise_supported(geom, dtype) is None, (k, dilation, dtype)
                for kind in ("fwd", "bwd_input", "bwd_weight"):
                    plan = depthwise_module._plan(geom, kind, acc, 48 * 1024)
                    assert plan.shared_entries * acc <= 48 * 1024
    geom = geometry((1, 4, 160, 160), (4, 1, 31, 31), padding=15)
    plan = depthwise_module._plan(geom, "fwd", 4, 48 * 1024)
    assert (plan.tile_h, plan.tile_w, plan.halo_h, plan.halo_w) == (32, 32, 62, 62)
    assert plan.shared_entries * 4 == (961 + 62 * 63) * 4  # 19.5 KiB: weights + the halo (odd pitch 63)


def test_output_tile_fits_the_region_it_overlays():
    """The forward and the input gradient stage their outputs in a [tile_h][tile_w + 1]
    tile over the halo; at stride 3 the input gradient's gy halo (6 x 11) is the smaller
    of the two, so the region is sized for the output tile (the sanitized runs of CASES[4]
    catch a shortfall as an out-of-bounds shared write)."""
    x, w, b, params = case_arrays(CASES[4], 4)
    geom = geometry(x.shape, w.shape, **params)
    for kind in ("fwd", "bwd_input"):
        plan = depthwise_module._plan(geom, kind, 4, 48 * 1024)
        taps = geom.kernel_h * geom.kernel_w
        assert plan.shared_entries == taps + max(plan.halo_h * plan.pitch, plan.tile_h * (plan.tile_w + 1)), kind
    plan = depthwise_module._plan(geom, "bwd_input", 4, 48 * 1024)
    assert (plan.tile_h, plan.tile_w, plan.halo_h, plan.pitch) == (12, 24, 6, 11)
    assert plan.shared_entries == 9 + 12 * 25


def test_workspace_is_chunks_by_channels_by_taps():
    x, w, b, params = case_arrays(CASES[2], 4)  # Cout 4, 37x41, 3x3
    x = np.concatenate([x] * 3)
    gy = np.ones(reference.conv2d(x, w, None, groups=2, **params).shape)
    geom = geometry(x.shape, w.shape, **params)
    chunks, per_chunk = wgrad_chunks(geom, depthwise_module._plan(geom, "bwd_weight", 8, 48 * 1024))
    assert (chunks, per_chunk) == (6, 1)  # 3 images x 2 bands of 32 rows, each its own chunk
    with _arrays.track_allocations() as allocations:
        dw_conv2d_backward(gy, x, w, None, **params, wrt="weight")
    assert allocations == [((6, 4, 9), "float64"), (w.shape, "float64")]


def test_unsupported_geometry_reports_a_reason_and_launches_nothing(launches):
    grouped = conv_geometry("conv2d", (1, 4, 9, 9), (4, 2, 3, 3), None, 1, 0, 1, 2)
    assert "groups == in_channels" in depthwise_supported(grouped, "float32")
    dense = conv_geometry("conv2d", (1, 1, 9, 9), (3, 1, 3, 3), None, 1, 0, 1, 1)  # groups 1 = Cin: depthwise
    assert depthwise_supported(dense, "float32") is None
    assert "upscale" in depthwise_supported(replace(dense, upscale=2), "float32")
    assert "float16, bfloat16" in depthwise_supported(dense, "int8")
    huge = geometry((1, 2, 300, 300), (2, 1, 31, 31), padding=120, dilation=8)  # extent 241: no 8x8 tile fits
    why = depthwise_supported(huge, "float32")
    assert why is not None and "241x241" in why
    with pytest.raises(ValueError, match=r"algorithm='depthwise' supports only kernels whose halo tile fits"):
        DEPTHWISE.check("conv2d", huge, "float32")
    x, w = np.ones((1, 4, 9, 9)), np.ones((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"conv2d: algorithm='depthwise' supports only depthwise"):
        dw_conv2d(x, w, groups=2)
    with pytest.raises(ValueError, match=r"conv2d_backward: algorithm='depthwise' supports only depthwise"):
        dw_conv2d_backward(np.ones((1, 4, 7, 7)), x, w, groups=2)
    assert launches == []
    dw_conv2d(np.ones((1, 2, 9, 9)), np.ones((4, 1, 3, 3)))
    assert launches == ["depthwise_fwd"]  # the fixture does see this op's launches
