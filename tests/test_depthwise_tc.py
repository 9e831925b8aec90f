"""The tensor-core depthwise path (cuconv/ops/depthwise_tc.py, kernels_cu/depthwise_tc.cu):
forward, input and weight gradients in float16 / bfloat16 under the design §2 rule
(float64 reference on the rounded inputs, torch CPU autograd in the same dtype as the
anchor), k in {1, 3, 9, 13, 31} and rectangular / even kernels, batch 0/1/2, bias or
not, wrt subsets, determinism, the multi-tile / multi-chunk / multi-pass / grid-stride
paths, the workspace, the shared-memory plans and unsupported geometry. The op is called
through depthwise_tc_forward / depthwise_tc_gradients directly, with the Call and geometry
built as conv2d() / conv2d_backward() build them."""

from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import depthwise_tc as tc_module
from cuconv.ops._common import Call
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.depthwise_tc import (KERNELS, check_depthwise_tc, depthwise_tc_forward, depthwise_tc_gradients,
                                     depthwise_tc_supported, wgrad_chunks)
from cuconv.reference import conv2d as reference
from conftest import (DTYPES, assert_reduced_precision, assert_wrt_subset, depthwise_case_arrays as case_arrays,
                      depthwise_geometry as geometry, depthwise_through, rel_err, to_backend, to_numpy, unit_roundoff)

HALF_DTYPES = ["float16", "bfloat16"]
# conv2d(..., algorithm='implicit_gemm') and conv2d_backward(...) on depthwise geometry, as
# conv2d() would route them
tc_conv2d, tc_conv2d_backward = depthwise_through(depthwise_tc_forward, depthwise_tc_gradients)


# (batch, channels, multiplier, H, W, k, params, bias): the kernel sizes on small
# odd images, padding k//2 / 'same' / 0 / asymmetric / larger than the kernel, multiplier
# 1 and 2, rectangular and even kernels.
CASES = [
    (2, 2, 1, 11, 13, 3, dict(padding=1), True),
    (1, 2, 2, 20, 23, 9, dict(padding=4), False),
    (2, 1, 1, 17, 15, 13, dict(padding="same"), True),
    (1, 1, 1, 20, 23, 31, dict(padding=15), True),                 # RepLKNet's kernel, small image
    (1, 1, 2, 20, 23, 31, dict(padding=(15, 7)), False),           # asymmetric padding, multiplier 2
    (1, 1, 1, 35, 33, 31, dict(padding=0), True),                  # 'valid': a 5x3 output
    (1, 2, 1, 9, 10, (5, 12), dict(padding=(2, 3)), False),        # rectangular kernel
    (2, 1, 1, 12, 9, (4, 4), dict(padding="same"), True),          # even kernel: asymmetric 'same'
    (1, 3, 1, 7, 6, 1, dict(padding=2), True),                     # 1x1, padding beyond the kernel
    # KW = 10 and 26 (= 10 mod 16): the last n block's band ends exactly on a k16 step
    (1, 2, 1, 9, 21, (7, 10), dict(padding=(3, 5)), True),
    (1, 1, 1, 12, 30, (5, 26), dict(padding="same"), False),
]


def half(a, dtype):
    return None if a is None else a.astype(DTYPES[dtype])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: f"k{CASES[i][5]}-m{CASES[i][2]}")
def test_within_twice_torch_error(dtype, index):
    """design §2 for the output and every gradient (input, weight, bias)."""
    x, w, b, params = case_arrays(CASES[index], index)
    params = dict(params, groups=x.shape[1])
    assert_reduced_precision(tc_conv2d, tc_conv2d_backward, reference.conv2d, reference.conv2d_backward,
                             lambda *t: F.conv2d(*t, **params), (x, w, b), params, dtype, index)


def test_cuda_backend_matches_reference(backend):
    """The same kernels on the backend fixture (cuda only where a GPU exists)."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    x, w, b, params = case_arrays(CASES[3], 3)
    x, w, b = (half(a, "float16") for a in (x, w, b))
    as64 = lambda a: a.astype(np.float64)  # noqa: E731
    y = tc_conv2d(*(to_backend(a, backend) for a in (x, w, b)), **params)
    y_ref = reference.conv2d(as64(x), as64(w), as64(b), groups=1, **params)
    assert rel_err(y, y_ref) <= 4 * unit_roundoff("float16")
    gy = np.random.default_rng(5).standard_normal(y_ref.shape).astype(np.float16)
    grads = tc_conv2d_backward(*(to_backend(a, backend) for a in (gy, x, w, b)), **params)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads,
                              reference.conv2d_backward(as64(gy), as64(x), as64(w), as64(b), groups=1, **params)):
        assert rel_err(g, g_ref) <= 4 * unit_roundoff("float16"), name


def test_matches_cuda_core_depthwise_closely():
    """Same float32 accumulation as depthwise.cu: results agree to about one float16
    rounding (only the fp32 summation order differs)."""
    from cuconv.ops.depthwise import depthwise_forward, depthwise_gradients

    x, w, b, params = case_arrays(CASES[4], 40)
    x, w = half(x, "float16"), half(w, "float16")
    gy = half(np.random.default_rng(1).standard_normal((1, 2, 20, 23 + 2 * 7 - 30)), "float16")
    call = Call("conv2d", input=x, weight=w)
    geom = geometry(x.shape, w.shape, **params)
    assert geom.output_shape == gy.shape
    cuda_core = depthwise_forward(call, geom)
    assert rel_err(tc_conv2d(x, w, **params), cuda_core.astype(np.float64)) <= 2 * unit_roundoff("float16")
    call = Call("conv2d_backward", input=x, grad_output=gy, weight=w)
    wanted = frozenset(("input", "weight"))
    for mine, theirs in zip(tc_conv2d_backward(gy, x, w, **params)[:2], depthwise_gradients(call, geom, wanted, False)):
        assert rel_err(mine, theirs.astype(np.float64)) <= 2 * unit_roundoff("float16")


def test_batch_zero_and_one():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((2, 1, 9, 9)).astype(np.float16), rng.standard_normal(2).astype(np.float16)
    x = np.zeros((0, 2, 12, 11), np.float16)
    y = tc_conv2d(x, w, b, padding=4)
    assert y.shape == (0, 2, 12, 11) and y.dtype == np.float16
    gx, gw, gb = tc_conv2d_backward(np.zeros((0, 2, 12, 11), np.float16), x, w, b, padding=4)
    assert gx.shape == (0, 2, 12, 11)
    np.testing.assert_array_equal(gw, np.zeros_like(w))  # a sum over nothing, written (outputs are poisoned)
    np.testing.assert_array_equal(gb, np.zeros(2, np.float16))
    x1 = rng.standard_normal((1, 2, 12, 11))
    params = dict(padding=4, groups=2)
    assert_reduced_precision(tc_conv2d, tc_conv2d_backward, reference.conv2d, reference.conv2d_backward,
                             lambda *t: F.conv2d(*t, **params), (x1, w, b), params, "float16", 1)


@pytest.mark.parametrize("wrt, expected", [
    ("input", ["depthwise_tc_bwd_input"]),
    ("weight", ["depthwise_tc_bwd_weight", "depthwise_tc_reduce_chunks"]),
    ("bias", ["conv2d_bwd_bias"]),
    (("input", "bias"), ["depthwise_tc_bwd_input", "conv2d_bwd_bias"]),
])
def test_wrt_subsets_compute_only_what_is_asked(launches, wrt, expected):
    x, w, b, params = case_arrays(CASES[2], 2)
    x, w, b = (half(a, "bfloat16") for a in (x, w, b))
    gy = half(np.random.default_rng(2).standard_normal(x.shape), "bfloat16")
    full = tc_conv2d_backward(gy, x, w, b, **params)
    launches.clear()
    got = tc_conv2d_backward(gy, x, w, b, **params, wrt=wrt)
    assert launches == expected
    assert_wrt_subset(got, full, wrt)


def test_without_bias_returns_none_for_it(launches):
    x, w, _, params = case_arrays(CASES[1], 1)
    x, w = half(x, "float16"), half(w, "float16")
    gy = half(np.random.default_rng(3).standard_normal((1, 4, 20, 23)), "float16")
    gx, gw, gb = tc_conv2d_backward(gy, x, w, None, **params)
    assert gx.shape == x.shape and gw.shape == w.shape and gb is None
    assert "conv2d_bwd_bias" not in launches


def test_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    x = np.ascontiguousarray(rng.standard_normal((2, 11, 10, 3)).astype(np.float16).transpose(0, 3, 1, 2))
    x = x[:, :, ::-1, :]
    w = rng.standard_normal((3, 1, 9, 9)).astype(np.float16).transpose(0, 1, 3, 2)
    assert not (x.flags.c_contiguous or w.flags.c_contiguous)
    y = tc_conv2d(x, w, padding=4)
    y_ref = reference.conv2d(x.astype(np.float64), w.astype(np.float64), None, padding=4, groups=3)
    assert rel_err(y, y_ref) <= 4 * unit_roundoff("float16")


def small_tiles(monkeypatch, out_channels):
    """16x32 forward / input-gradient tiles (one warp), 8x16 weight-gradient tiles, two
    weight-gradient chunks and a 3-block grid: the multi-tile, multi-chunk and
    grid-stride paths at test sizes."""
    monkeypatch.setattr(tc_module, "_TILES", ((16, 32),))
    monkeypatch.setattr(tc_module, "_WGRAD_TILES", ((8, 16),))
    monkeypatch.setattr(tc_module, "_WGRAD_TARGET_BLOCKS", 2 * out_channels)
    monkeypatch.setattr(_common, "_MAX_GRID", 3)


@pytest.mark.parametrize("case", [
    (2, 1, 2, 20, 37, 9, dict(padding=4), True),
    (2, 1, 1, 20, 35, 31, dict(padding=15), False),
    (1, 1, 1, 20, 23, (33, 24), dict(padding=(16, 11)), True),  # 3 x 3 accumulator tiles: two wgrad passes
], ids=["k9-m2", "k31", "k33x24"])
def test_multi_tile_multi_chunk_paths(case, monkeypatch):
    x, w, b, params = case_arrays(case, 77)
    small_tiles(monkeypatch, w.shape[0])
    geom = geometry(x.shape, w.shape, **params)
    budget = 48 * 1024
    fwd, bwd_input = tc_module._plan(geom, "fwd", budget), tc_module._plan(geom, "bwd_input", budget)
    assert tc_module._tiles(geom.out_h, geom.out_w, fwd) > 1 and tc_module._tiles(geom.in_h, geom.in_w, bwd_input) > 1
    chunks, per_chunk = wgrad_chunks(geom, tc_module._plan(geom, "bwd_weight", budget))
    assert chunks == 2 and per_chunk > 1
    pairs = -(-geom.kernel_h // 16) * -(-geom.kernel_w // 8)
    assert (pairs > tc_module._WGRAD_PAIRS) == (geom.kernel_h == 33)
    params = dict(params, groups=x.shape[1])
    assert_reduced_precision(tc_conv2d, tc_conv2d_backward, reference.conv2d, reference.conv2d_backward,
                             lambda *t: F.conv2d(*t, **params), (x, w, b), params, "float16", 7)


def test_bitwise_deterministic(monkeypatch):
    monkeypatch.setattr(tc_module, "_WGRAD_TARGET_BLOCKS", 12)  # 3 chunks of 2 tiles per channel
    x, w, b, params = case_arrays(CASES[1], 9)
    x = np.concatenate([x, -x, 0.5 * x])
    x, w = half(x, "bfloat16"), half(w, "bfloat16")
    gy = half(np.random.default_rng(1).standard_normal((3, 4, 20, 23)), "bfloat16")
    assert wgrad_chunks(geometry(x.shape, w.shape, **params),
                        tc_module._plan(geometry(x.shape, w.shape, **params), "bwd_weight", 48 * 1024))[0] > 1
    first = [tc_conv2d(x, w, **params), *tc_conv2d_backward(gy, x, w, **params)[:2]]
    second = [tc_conv2d(x, w, **params), *tc_conv2d_backward(gy, x, w, **params)[:2]]
    for a, c in zip(first, second):
        assert a.view(np.uint16).tobytes() == c.view(np.uint16).tobytes()


def test_workspace_is_chunks_by_channels_by_taps():
    x, w, _, params = case_arrays(CASES[1], 4)  # Cout 4, 20x23, 9x9
    x, w = half(x, "float16"), half(w, "float16")
    gy = half(np.ones((1, 4, 20, 23)), "float16")
    geom = geometry(x.shape, w.shape, **params)
    chunks, per_chunk = wgrad_chunks(geom, tc_module._plan(geom, "bwd_weight", 48 * 1024))
    assert (chunks, per_chunk) == (2, 1)  # two 16-row tiles of 32 columns, each its own chunk
    with _arrays.track_allocations() as allocations:
        tc_conv2d_backward(gy, x, w, None, **params, wrt="weight")
    assert allocations == [((2, 4, 81), "float32"), (w.shape, "float16")]
    with _arrays.track_allocations() as allocations:
        tc_conv2d_backward(gy, x, w, None, **params, wrt="input")
        tc_conv2d(x, w, **params)
    assert allocations == [(x.shape, "float16"), ((1, 4, 20, 23), "float16")]  # outputs only


def test_shared_memory_plans():
    """Every odd k up to 31 (and 33x24) is supported at 160x160 with every plan within
    48 KiB; RepLKNet's k = 31 keeps the largest tiles."""
    for k in range(1, 32, 2):
        geom = geometry((1, 4, 160, 160), (8, 1, k, k), padding=k // 2)
        assert depthwise_tc_supported(geom, "float16") is None, k
        for kind in ("fwd", "bwd_input", "bwd_weight"):
            plan = tc_module._plan(geom, kind, 48 * 1024)
            assert plan.shared_bytes <= 48 * 1024
            assert plan.pitch % 16 == 8 and plan.span % 16 == 0 and plan.span >= plan.tile_w + k - 1
    geom = geometry((1, 4, 160, 160), (4, 1, 31, 31), padding=15)
    fwd = tc_module._plan(geom, "fwd", 48 * 1024)
    assert (fwd.tile_h, fwd.tile_w, fwd.span, fwd.halo_rows, fwd.threads) == (32, 64, 96, 62, 128)
    assert fwd.shared_bytes == (62 * 104 + 2 * 31 * 72) * 2  # halo + two weight copies: 21.3 KiB
    wgrad = tc_module._plan(geom, "bwd_weight", 48 * 1024)
    assert (wgrad.tile_h, wgrad.tile_w, wgrad.halo_rows) == (16, 64, 16 + 32 - 1)
    assert wgrad.shared_bytes == (47 * 104 + 2 * 16 * 120) * 2  # 17.0 KiB (the reduction reuses it)


def test_kernel_module_registered_for_half_types_only():
    assert KERNELS.dtypes == ("float16", "bfloat16")
    assert KERNELS.name_expressions == [f"{k}<{t}>" for k in ("depthwise_tc_fwd", "depthwise_tc_bwd_input",
                                                              "depthwise_tc_bwd_weight", "depthwise_tc_reduce_chunks")
                                        for t in ("__half", "__nv_bfloat16")]


def test_unsupported_geometry_reports_a_reason_and_launches_nothing(launches):
    geom = geometry((1, 2, 9, 9), (2, 1, 3, 3))
    assert depthwise_tc_supported(geom, "float16") is None
    assert depthwise_tc_supported(geometry((1, 2, 9, 9), (6, 1, 3, 3)), "bfloat16") is None  # multiplier 3
    grouped = conv_geometry("conv2d", (1, 4, 9, 9), (4, 2, 3, 3), None, 1, 0, 1, 2)
    assert "groups == in_channels" in depthwise_tc_supported(grouped, "float16")
    assert "float16 and bfloat16" in depthwise_tc_supported(geom, "float32")
    assert "stride 1 and dilation 1" in depthwise_tc_supported(geometry((1, 2, 9, 9), (2, 1, 3, 3), stride=2),
                                                                 "float16")
    assert "dilation (2, 2)" in depthwise_tc_supported(geometry((1, 2, 9, 9), (2, 1, 3, 3), dilation=2), "float16")
    assert "upscale" in depthwise_tc_supported(replace(geom, upscale=2), "float16")
    huge = geometry((1, 1, 100, 100), (1, 1, 99, 99), padding=49)
    assert "99x99 kernel" in depthwise_tc_supported(huge, "float16")
    with pytest.raises(ValueError, match=r"conv2d: algorithm='implicit_gemm' supports only depthwise kernels whose"):
        check_depthwise_tc("conv2d", huge, "float16")
    x, w = np.ones((1, 2, 9, 9), np.float16), np.ones((2, 1, 3, 3), np.float16)
    with pytest.raises(ValueError, match=r"conv2d: algorithm='implicit_gemm' supports only stride 1"):
        tc_conv2d(x, w, stride=2)
    with pytest.raises(ValueError, match=r"conv2d_backward: algorithm='implicit_gemm' supports only float16"):
        tc_conv2d_backward(np.ones((1, 2, 7, 7)), x.astype(np.float64), w.astype(np.float64))
    with pytest.raises(ValueError, match=r"conv2d_backward: algorithm='implicit_gemm' supports only depthwise"):
        tc_conv2d_backward(np.ones((1, 2, 7, 7), np.float16), np.ones((1, 4, 9, 9), np.float16),
                           np.ones((2, 2, 3, 3), np.float16), groups=2)
    assert launches == []
    tc_conv2d(x, w)
    assert launches == ["depthwise_tc_fwd"]  # the fixture does see this op's launches


def test_bfloat16_results_are_bfloat16():
    x, w, b, params = case_arrays(CASES[0], 0)
    x, w, b = (half(a, "bfloat16") for a in (x, w, b))
    y = to_numpy(tc_conv2d(x, w, b, **params))
    assert y.dtype == ml_dtypes.bfloat16 and y.shape == (2, 2, 11, 13)


def test_conv2d_implicit_gemm_routes_depthwise_here(launches):
    """cuconv.conv2d(..., algorithm='implicit_gemm') on a stride-1 depthwise conv runs these
    kernels (bitwise what depthwise_tc_forward gives); a strided depthwise conv falls to
    the general implicit GEMM."""
    import cuconv

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 12, 11)).astype(np.float16)
    w = rng.standard_normal((4, 1, 9, 9)).astype(np.float16)
    gy = rng.standard_normal((1, 4, 12, 11)).astype(np.float16)
    y = cuconv.conv2d(x, w, padding=4, groups=4, algorithm="implicit_gemm")
    assert launches == ["depthwise_tc_fwd"]
    grads = cuconv.conv2d_backward(gy, x, w, padding=4, groups=4, algorithm="implicit_gemm")
    assert "depthwise_tc_bwd_input" in launches and "depthwise_tc_bwd_weight" in launches
    assert rel_err(y, cuconv.conv2d(x, w, padding=4, groups=4, algorithm="depthwise")) < 4 * unit_roundoff("float16")
    for mine, theirs in zip(grads[:2], cuconv.conv2d_backward(gy, x, w, padding=4, groups=4, algorithm="depthwise")):
        assert rel_err(mine, theirs.astype(np.float64)) < 4 * unit_roundoff("float16")
    launches.clear()
    cuconv.conv2d(x, w, stride=2, padding=4, groups=4, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_fwd"]
