"""conv2d's algorithm='implicit_gemm' (cuconv/ops/conv2d_igemm.py, kernels_cu/conv2d_igemm.cu):
forward, dgrad and split-K wgrad, and the tensor-core helper they are built on
(kernels_cu/common/mma.cuh).

The mma probe pins mma.cuh's host fallback to the PTX ISA m16n8k16 fragment layout on
interpret, and the real instruction to the same layout on cuda (when a GPU exists).
The conv is called through conv2d_implicit_gemm(call, geom) and
conv2d_implicit_gemm_gradients(call, geom, wanted, has_bias) directly, with the Call and
geometry built as conv2d() / conv2d_backward() build them."""

import importlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from cuconv import _arrays, _interpret
from cuconv._kernels import KernelModule
from cuconv.ops._common import Call, parse_wrt
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.conv2d_igemm import (KERNELS, conv2d_implicit_gemm, conv2d_implicit_gemm_gradients,
                                     implicit_gemm_supported, wgrad_split)
from conftest import DTYPES, rel_err, to_backend, to_numpy, torch_autograd, unit_roundoff, within_twice_anchor

reference = importlib.import_module("cuconv.reference.conv2d")

HALF_DTYPES = ["float16", "bfloat16"]

PROBE = KernelModule(
    "mma_probe.cu",
    kernels=("probe_mma",),
    params_struct="MmaProbeParams",
    dtypes=("float16", "bfloat16"),
    directory=Path(__file__).parent / "kernels",
)


def to_device(a, backend):
    """A NumPy array where `backend` runs (bfloat16 via torch on the GPU: CuPy lacks it)."""
    if backend == "interpret" or a is None:
        return a
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
    return to_backend(a, backend)


# --- the mma helper against the documented fragment layout ---

def run_probe(backend, dtype, a, b, c):
    tiles = a.shape[0]
    d = np.full((tiles, 16, 8), np.nan, np.float32)
    grid, block = (-(-tiles // 2), 1, 1), (64, 1, 1)  # two warps per block, the last one idle if odd
    params = PROBE.params(tiles=tiles)
    if backend == "interpret":
        _interpret.launch(PROBE, "probe_mma", dtype, grid, block, 0, params, [a, b, c, d])
        return d
    import cupy

    from cuconv import _cuda

    dev = [cupy.asarray(v.view(np.uint16) if v.dtype.itemsize == 2 else v) for v in (a, b, c, d)]
    _cuda.launch(PROBE, "probe_mma", dtype, grid, block, 0, params, dev, 0, cupy.cuda.get_current_stream())
    return cupy.asnumpy(dev[3])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_mma_m16n8k16_matches_a_times_b_plus_c(backend, dtype):
    rng = np.random.default_rng(7)
    tiles = 3
    a = rng.standard_normal((tiles, 16, 16)).astype(DTYPES[dtype])
    b = rng.standard_normal((tiles, 16, 8)).astype(DTYPES[dtype])
    c = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    d = run_probe(backend, dtype, a, b, c)
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64)) + c.astype(np.float64)
    # fp16/bf16 products are exact in float32; only the float32 accumulation rounds
    assert np.abs(d - expected).max() <= 32 * np.finfo(np.float32).eps * np.abs(expected).max()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mma_probe_compiles_for_the_gpu(arch):
    """The inline-PTX path (not built on interpret) assembles for every target."""
    pytest.importorskip("nvidia.cuda_nvrtc", reason="pip install nvidia-cuda-nvrtc-cu12")
    from cuconv._nvrtc import compile_to_cubin

    result = compile_to_cubin(PROBE.source(), PROBE.name_expressions, arch=arch, program_name=PROBE.filename)
    for name in PROBE.name_expressions:
        assert result.resources[name].spill_stores == 0


# --- conv2d through the implicit GEMM ---

def igemm_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(..., algorithm='implicit_gemm') as conv2d() would dispatch it."""
    call = Call("conv2d", input=x, weight=w, bias=b, optional=("bias",))
    geom = conv_geometry("conv2d", call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups)
    return conv2d_implicit_gemm(call, geom)


def torch_conv(params):
    return lambda x, w, b=None: torch.nn.functional.conv2d(x, w, b, **params)


# (B, Cin, H, W, Cout, kh, kw, params, bias): M = B*Ho*Wo, N = Cout, K = Cin*kh*kw
CASES = [
    (2, 3, 9, 11, 5, 3, 3, dict(padding=1), True),                        # M 198, N 5, K 27
    (3, 5, 7, 6, 70, 3, 2, dict(stride=2, padding=(1, 0)), False),       # N 70: two N tiles
    (1, 4, 10, 9, 9, 3, 3, dict(padding="same", dilation=2), True),      # 'same' with dilation
    (2, 7, 8, 8, 12, 2, 4, dict(padding="same"), False),                 # asymmetric 'same'
    (1, 9, 13, 10, 16, 1, 1, dict(stride=(2, 3)), True),                 # 1x1, K 9
    (2, 12, 6, 7, 8, 3, 3, dict(padding=2, dilation=(1, 2)), True),      # K 108: 4 BK steps, tail 12
    (1, 6, 9, 9, 10, 3, 3, dict(padding=1, groups=2), True),             # grouped
    (3, 16, 12, 11, 96, 3, 3, dict(padding=1), True),                    # M 396 (7 tiles), N 96, K 144
]


def random_cases(count, seed=2024):
    """Seeded random valid configurations (odd sizes, stride, padding, dilation)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        batch, cin, h, w_ = (int(v) for v in rng.integers([1, 1, 3, 3], [4, 9, 14, 14]))
        cout, kh, kw = (int(v) for v in rng.integers([1, 1, 1], [80, 5, 5]))
        stride, dilation = (int(v) for v in rng.integers(1, 3, 2))
        padding = "same" if stride == 1 and rng.random() < 0.3 else int(rng.integers(0, 3))
        params = dict(stride=stride, padding=padding, dilation=dilation)
        try:
            conv_geometry("case", (batch, cin, h, w_), (cout, cin, kh, kw), None, **params, groups=1)
        except ValueError:
            continue
        cases.append((batch, cin, h, w_, cout, kh, kw, params, bool(rng.random() < 0.5)))
    return cases


CASES += random_cases(6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}x{c[5]}x{c[6]}")
def test_matches_reference_within_twice_torch(backend, dtype, case):
    batch, cin, h, w_, cout, kh, kw, params, with_bias = case
    rng = np.random.default_rng(hash((batch, cin, h, w_, cout, kh, kw)) % 2**32)
    groups = params.get("groups", 1)
    x = rng.standard_normal((batch, cin, h, w_)).astype(DTYPES[dtype])
    w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(DTYPES[dtype])
    b = rng.standard_normal(cout).astype(DTYPES[dtype]) if with_bias else None
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    ref = reference.conv2d(as64(x), as64(w), as64(b), **params)
    anchor, _ = torch_autograd(torch_conv(params), [as64(x), as64(w), as64(b)], None, dtype)
    y = igemm_conv2d(*(to_device(a, backend) for a in (x, w, b)), **params)
    got = to_numpy(y)
    assert got.dtype == DTYPES[dtype] and got.shape == ref.shape
    assert not np.isnan(got.astype(np.float64)).any()  # CUCONV_POISON: every element written
    # DESIGN §5: within twice the anchor's error (torch CPU conv2d in the same dtype)
    assert rel_err(got, ref) <= 2 * rel_err(anchor, ref) + 2 * unit_roundoff(dtype)


def test_matches_direct_kernel_closely():
    """Same float32 accumulation as the direct kernel: the outputs agree to about one
    float16 rounding of the output (the K sums differ only in fp32 summation order)."""
    from cuconv.ops.conv2d import conv2d

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 10)).astype(np.float16)
    w = rng.standard_normal((20, 6, 3, 3)).astype(np.float16)
    b = rng.standard_normal(20).astype(np.float16)
    got = igemm_conv2d(x, w, b, stride=(1, 2), padding=1)
    direct = conv2d(x, w, b, stride=(1, 2), padding=1, algorithm="direct")
    assert rel_err(got, direct.astype(np.float64)) <= 2 * unit_roundoff("float16")


def test_batch_zero():
    x = np.zeros((0, 3, 5, 5), np.float16)
    w = np.ones((4, 3, 3, 3), np.float16)
    y = igemm_conv2d(x, w, padding=1)
    assert y.shape == (0, 4, 5, 5) and y.dtype == np.float16


def test_deterministic_bitwise():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 9, 9)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((7, 5, 3, 3)).astype(ml_dtypes.bfloat16)
    first = igemm_conv2d(x, w, padding=1)
    second = igemm_conv2d(x, w, padding=1)
    assert np.array_equal(first.view(np.uint16), second.view(np.uint16))


def test_no_intermediate_allocation():
    """The im2col matrix is never materialised: only the output is allocated."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float16)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float16)
    with _arrays.track_allocations() as allocations:
        igemm_conv2d(x, w, padding=1)
    assert allocations == [((1, 6, 8, 8), "float16")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unsupported_dtype_reports_a_reason_and_launches_nothing(dtype, launches):
    x = np.ones((1, 2, 5, 5), dtype)
    w = np.ones((3, 2, 3, 3), dtype)
    geom = conv_geometry("conv2d", x.shape, w.shape, None, 1, 0, 1, 1)
    why = implicit_gemm_supported(geom, dtype)
    assert why is not None and dtype in why
    with pytest.raises(ValueError, match="implicit_gemm.*float16 and bfloat16"):
        igemm_conv2d(x, w)
    assert launches == []


def test_supported_reports_none_and_rejects_pixel_shuffled_output():
    geom = conv_geometry("conv2d", (1, 2, 5, 5), (8, 2, 3, 3), None, 1, 0, 1, 1)
    assert implicit_gemm_supported(geom, "float16") is None
    assert implicit_gemm_supported(geom, "bfloat16") is None
    from dataclasses import replace

    assert "upscale" in implicit_gemm_supported(replace(geom, upscale=2), "float16")


def test_kernel_module_registered_for_half_types_only():
    assert KERNELS.dtypes == ("float16", "bfloat16")
    assert KERNELS.name_expressions == [f"{k}<{t}>" for k in ("conv2d_igemm_fwd", "conv2d_igemm_bwd_input",
                                                              "conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits")
                                        for t in ("__half", "__nv_bfloat16")]


def test_public_api_selects_it_only_on_request(launches):
    """cuconv.conv2d(..., algorithm='implicit_gemm') runs this kernel and conv2d_backward
    by name runs dgrad + wgrad; 'auto' never does; an unsupported dtype is refused before
    any launch, forward and backward."""
    import cuconv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float16)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float16)
    y = cuconv.conv2d(x, w, padding=1, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_fwd"]
    assert rel_err(y, cuconv.conv2d(x, w, padding=1)) < 4 * unit_roundoff("float16")
    assert launches[-1] == "conv2d_fwd"  # 'auto' kept the direct kernel
    launches.clear()
    gy = rng.standard_normal(y.shape).astype(np.float16)
    grads = cuconv.conv2d_backward(gy, x, w, padding=1, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits"]
    direct = cuconv.conv2d_backward(gy, x, w, padding=1, algorithm="direct")
    assert grads[2] is None and direct[2] is None  # no bias
    for mine, theirs in zip(grads[:2], direct[:2]):
        assert rel_err(mine, theirs.astype(np.float64)) < 4 * unit_roundoff("float16")
    launches.clear()
    with pytest.raises(ValueError, match="implicit_gemm"):
        cuconv.conv2d(x.astype(np.float32), w.astype(np.float32), algorithm="implicit_gemm")
    with pytest.raises(ValueError, match="implicit_gemm"):
        cuconv.conv2d_backward(np.ones((2, 6, 7, 5), np.float32), x.astype(np.float32), w.astype(np.float32),
                               algorithm="implicit_gemm")
    assert launches == []


# --- the gradients: dgrad (conv2d_igemm_bwd_input) and split-K wgrad ---

def igemm_conv2d_backward(gy, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, wrt=None):
    """conv2d_backward(..., algorithm='implicit_gemm') as conv2d_backward() dispatches it."""
    call = Call("conv2d_backward", input=x, grad_output=gy, weight=w, bias=b, optional=("bias",))
    geom = conv_geometry("conv2d_backward", call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups)
    wanted = parse_wrt("conv2d_backward", wrt, ("input", "weight", "bias"))
    return conv2d_implicit_gemm_gradients(call, geom, wanted, b is not None)


def geometry(x_shape, w_shape, **params):
    params.setdefault("groups", 1)
    return conv_geometry("case", x_shape, w_shape, None, params.get("stride", 1), params.get("padding", 0),
                         params.get("dilation", 1), params["groups"])


# (B, Cin, H, W, Cout, kh, kw, params, bias). dgrad: SH*SW stride phases, each M = B*Hr*Wr,
# N = Cin_g, K = Cout_g*(the phase's taps); wgrad: M = Cout_g, N = Cin_g*kh*kw, K = B*Ho*Wo
# (split-K slices from wgrad_split)
BACKWARD_CASES = [
    (2, 3, 9, 11, 5, 3, 3, dict(padding=1), True),                       # odd sizes; wgrad K 198: 2 slices
    (2, 5, 11, 10, 7, 3, 3, dict(stride=2, padding=1), False),          # stride 2: dgrad's divisibility
    (1, 4, 13, 14, 6, 3, 2, dict(stride=(3, 2), padding=(1, 0)), True),  # stride 3 x 2, asymmetric kernel
    (1, 3, 10, 11, 4, 2, 3, dict(stride=3, padding=2, dilation=(2, 1)), False),  # stride 3, dilation, pad
    (2, 4, 9, 8, 5, 3, 3, dict(stride=2, padding=2, dilation=2), False),  # DH % SH == 0: phases with no tap
    (1, 2, 9, 10, 3, 2, 2, dict(stride=4, padding=(0, 1)), True),       # stride 4, 2 taps: tapless phases
    (1, 3, 2, 7, 4, 3, 3, dict(stride=3, padding=1), True),             # H < SH: a phase with no pixel
    (1, 4, 10, 9, 9, 3, 3, dict(padding="same", dilation=2), True),     # 'same' with dilation
    (2, 7, 8, 8, 12, 2, 4, dict(padding="same"), False),                # asymmetric 'same'
    (1, 6, 9, 9, 10, 3, 3, dict(padding=1, groups=2), True),            # grouped
    (2, 6, 8, 9, 12, 3, 3, dict(padding=1, groups=6), True),            # depthwise-like: Cin_g 1, Cout_g 2
    (1, 70, 5, 6, 9, 1, 1, dict(), False),                              # dgrad N 70 (2 tiles); wgrad N 70
    (2, 20, 7, 9, 70, 3, 3, dict(padding=1), True),                     # dgrad K 630; wgrad M 70, N 180
    (2, 3, 21, 19, 8, 3, 3, dict(padding=1), False),                    # wgrad K 798: 7 slices, last partial
]


def backward_inputs(case, dtype):
    batch, cin, h, w_, cout, kh, kw, params, with_bias = case
    rng = np.random.default_rng(hash((batch, cin, h, w_, cout, kh, kw, "bwd")) % 2**32)
    groups = params.get("groups", 1)
    x = rng.standard_normal((batch, cin, h, w_)).astype(DTYPES[dtype])
    w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(DTYPES[dtype])
    b = rng.standard_normal(cout).astype(DTYPES[dtype]) if with_bias else None
    shape = geometry(x.shape, w.shape, **params).output_shape
    gy = rng.standard_normal(shape).astype(DTYPES[dtype])
    return gy, x, w, b


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}x{c[5]}x{c[6]}")
def test_gradients_match_reference_within_twice_torch(backend, dtype, case):
    params = case[7]
    gy, x, w, b = backward_inputs(case, dtype)
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    refs = reference.conv2d_backward(as64(gy), as64(x), as64(w), as64(b), **params)
    _, anchors = torch_autograd(torch_conv(params), [as64(x), as64(w), as64(b)], as64(gy), dtype)
    grads = igemm_conv2d_backward(*(to_device(a, backend) for a in (gy, x, w, b)), **params)
    assert (grads[2] is None) == (b is None)
    for name, got, anchor, ref in zip(("input", "weight", "bias"), grads, anchors, refs):
        if ref is None:
            continue
        got = to_numpy(got)
        assert got.dtype == DTYPES[dtype] and got.shape == ref.shape, name
        assert not np.isnan(got.astype(np.float64)).any(), name  # CUCONV_POISON: every element written
        # DESIGN §5: within twice the anchor's error (torch CPU autograd in the same dtype)
        assert within_twice_anchor(got, anchor, ref, dtype), (name, rel_err(got, ref), rel_err(anchor, ref))


def test_gradients_match_direct_kernels_closely():
    """Same float32 accumulation as conv2d.cu's bwd_input / bwd_weight: the results agree
    to about one float16 rounding (only the fp32 summation order differs)."""
    from cuconv.ops.conv2d import KERNELS as DIRECT, conv_gradients

    gy, x, w, b = backward_inputs((2, 6, 9, 10, 20, 3, 3, dict(stride=2, padding=1), True), "float16")
    got = igemm_conv2d_backward(gy, x, w, b, stride=2, padding=1)
    call = Call("conv2d_backward", input=x, grad_output=gy, weight=w, bias=b, optional=("bias",))
    geom = conv_geometry("conv2d_backward", x.shape, w.shape, b.shape, 2, 1, 1, 1)
    direct = conv_gradients(call, geom, frozenset(("input", "weight", "bias")), True)
    assert DIRECT.filename == "conv2d.cu"
    for mine, theirs in zip(got, direct):
        assert rel_err(mine, theirs.astype(np.float64)) <= 2 * unit_roundoff("float16")
    assert np.array_equal(got[2], direct[2])  # the bias gradient is the direct kernel's


def test_wgrad_split_rule():
    """S slices of `steps` BK steps: none empty, covering K, fixed by the shape; more
    slices when the (group, m, n) tiles alone cannot fill the GPU, none for big channels."""
    for x_shape, w_shape, params in [((2, 3, 21, 19), (8, 3, 3, 3), dict(padding=1)),
                                     ((256, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
                                     ((256, 512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
                                     ((1, 4, 5, 5), (4, 4, 3, 3), dict()),
                                     ((0, 4, 5, 5), (4, 4, 3, 3), dict())]:
        geom = geometry(x_shape, w_shape, **params)
        splits, steps = wgrad_split(geom)
        k_steps = -(-geom.batch * geom.out_h * geom.out_w // 32)
        assert 1 <= splits <= 64 and steps >= 1
        assert (splits - 1) * steps < max(k_steps, 1) <= splits * steps  # no empty slice, K covered
        assert wgrad_split(geom) == (splits, steps)
    assert wgrad_split(geometry((256, 512, 7, 7), (512, 512, 3, 3), padding=1))[0] == 1  # 576 tiles: no split
    assert wgrad_split(geometry((256, 64, 56, 56), (64, 64, 3, 3), padding=1))[0] == 30  # 9 tiles
    assert wgrad_split(geometry((1, 4, 5, 5), (4, 4, 3, 3)))[0] == 1  # one BK step


def test_wgrad_several_slices_with_a_partial_last_one_and_its_workspace(launches):
    """The last BACKWARD_CASES entry really splits K (checked against the reference
    above); here: its slices, its workspace's size, and nothing else allocated."""
    gy, x, w, _ = backward_inputs(BACKWARD_CASES[-1], "bfloat16")
    geom = geometry(x.shape, w.shape, padding=1)
    splits, steps = wgrad_split(geom)
    k = geom.batch * geom.out_h * geom.out_w
    assert splits == 7 and k - (splits - 1) * steps * 32 < steps * 32 and k % 32
    with _arrays.track_allocations() as allocations:
        igemm_conv2d_backward(gy, x, w, padding=1, wrt="weight")
    assert allocations == [((splits, 8, 3 * 3 * 3), "float32"), (w.shape, "bfloat16")]
    assert launches == ["conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits"]


def test_dgrad_allocates_only_its_output(launches):
    gy, x, w, _ = backward_inputs(BACKWARD_CASES[1], "float16")
    with _arrays.track_allocations() as allocations:
        igemm_conv2d_backward(gy, x, w, stride=2, padding=1, wrt="input")
    assert allocations == [(x.shape, "float16")]
    assert launches == ["conv2d_igemm_bwd_input"]


def test_gradients_deterministic_bitwise():
    gy, x, w, b = backward_inputs(BACKWARD_CASES[-1], "float16")
    first = igemm_conv2d_backward(gy, x, w, b, padding=1)
    second = igemm_conv2d_backward(gy, x, w, b, padding=1)
    for a, c in zip(first, second):
        assert (a is None) == (c is None)
        if a is not None:
            assert np.array_equal(a.view(np.uint16), c.view(np.uint16))


@pytest.mark.parametrize("wrt, expected", [
    ("input", ["conv2d_igemm_bwd_input"]),
    ("weight", ["conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits"]),
    ("bias", ["conv2d_bwd_bias"]),
    (("input", "bias"), ["conv2d_igemm_bwd_input", "conv2d_bwd_bias"]),
])
def test_wrt_subsets_compute_only_what_is_asked(launches, wrt, expected):
    gy, x, w, b = backward_inputs(BACKWARD_CASES[0], "float16")
    full = igemm_conv2d_backward(gy, x, w, b, padding=1)
    launches.clear()
    got = igemm_conv2d_backward(gy, x, w, b, padding=1, wrt=wrt)
    assert launches == expected
    names = (wrt,) if isinstance(wrt, str) else wrt
    for name, one, everything in zip(("input", "weight", "bias"), got, full):
        if name in names:
            assert np.array_equal(one.view(np.uint16), everything.view(np.uint16)), name
        else:
            assert one is None, name


def test_gradients_without_bias_return_none_for_it(launches):
    gy, x, w, _ = backward_inputs(BACKWARD_CASES[1], "bfloat16")
    gx, gw, gb = igemm_conv2d_backward(gy, x, w, None, stride=2, padding=1)
    assert gx.shape == x.shape and gw.shape == w.shape and gb is None
    assert "conv2d_bwd_bias" not in launches


def test_gradients_batch_zero():
    x = np.zeros((0, 3, 5, 5), np.float16)
    w = np.ones((4, 3, 3, 3), np.float16)
    b = np.ones(4, np.float16)
    gy = np.zeros((0, 4, 5, 5), np.float16)
    gx, gw, gb = igemm_conv2d_backward(gy, x, w, b, padding=1)
    assert gx.shape == (0, 3, 5, 5) and gx.dtype == np.float16
    assert gw.shape == w.shape and gw.dtype == np.float16 and np.array_equal(gw, np.zeros_like(w))  # not NaN
    assert np.array_equal(gb, np.zeros(4, np.float16))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_unsupported_dtype_launch_nothing(dtype, launches):
    x = np.ones((1, 2, 5, 5), dtype)
    w = np.ones((3, 2, 3, 3), dtype)
    with pytest.raises(ValueError, match="conv2d_backward: algorithm='implicit_gemm'.*float16 and bfloat16"):
        igemm_conv2d_backward(np.ones((1, 3, 3, 3), dtype), x, w)
    assert launches == []
