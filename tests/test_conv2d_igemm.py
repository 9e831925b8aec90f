"""conv2d's algorithm='implicit_gemm' (cuconv/ops/conv2d_igemm.py, kernels_cu/conv2d_igemm.cu):
forward, dgrad and split-K wgrad, and the tensor-core helper they are built on
(kernels_cu/common/mma.cuh).

The mma probe pins mma.cuh's host fallback to the PTX ISA m16n8k16 fragment layout on
interpret, and the real instruction to the same layout on cuda (when a GPU exists).
The conv is called through conv2d_implicit_gemm(call, geom) and
conv2d_implicit_gemm_gradients(call, geom, wanted, has_bias) directly, with the Call and
geometry built as conv2d() / conv2d_backward() build them."""

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from cuconv import _arrays, _interpret
from cuconv._kernels import KernelModule
from cuconv.ops._common import Call
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.conv2d_igemm import (KERNELS, conv2d_implicit_gemm, conv2d_implicit_gemm_gradients,
                                     implicit_gemm_supported, launch_igemm_forward, launch_igemm_grad_input,
                                     launch_igemm_grad_weight, wgrad_split)
from cuconv.reference import conv2d as reference
from cuconv.reference import conv_transpose2d as reference_transpose
from cuconv.reference import pixel_shuffle as shuffle_reference
from cuconv.reference import subpixel as reference_subpixel
from conftest import (DTYPES, assert_wrt_subset, conv2d_backward_through, conv2d_through, rel_err, to_backend,
                      to_numpy, torch_autograd, unit_roundoff, within_twice_anchor)

HALF_DTYPES = ["float16", "bfloat16"]

PROBE = KernelModule(
    "mma_probe.cu",
    kernels=("probe_mma", "probe_ldmatrix"),
    params_struct="MmaProbeParams",
    dtypes=("float16", "bfloat16"),
    directory=Path(__file__).parent / "kernels",
)
PROBE_TF32 = KernelModule(
    "mma_probe.cu",
    kernels=("probe_mma_tf32", "probe_tf32_round"),
    params_struct="MmaProbeParams",
    dtypes=("float32",),
    directory=Path(__file__).parent / "kernels",
)


# --- the mma helper against the documented fragment layout ---

def launch_probe(backend, module, kernel, dtype, tiles, arrays):
    """kernel<dtype> over `tiles` warps (two per block, the last one idle if odd) on NumPy
    `arrays`; returns the last array, written by the kernel."""
    grid, block = (max(1, -(-tiles // 2)), 1, 1), (64, 1, 1)
    params = module.params(tiles=tiles)
    if backend == "interpret":
        _interpret.launch(module, kernel, dtype, grid, block, 0, params, arrays)
        return arrays[-1]
    import cupy

    from cuconv import _cuda

    dev = [cupy.asarray(v.view(np.uint16) if v.dtype.itemsize == 2 else v) for v in arrays]
    _cuda.launch(module, kernel, dtype, grid, block, 0, params, dev, 0, cupy.cuda.get_current_stream())
    return cupy.asnumpy(dev[-1])


def run_probe(backend, dtype, a, b, c):
    d = np.full((a.shape[0], 16, 8), np.nan, np.float32)
    return launch_probe(backend, PROBE, "probe_mma", dtype, a.shape[0], [a, b, c, d])


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


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_ldmatrix_x4_follows_the_ptx_isa(backend, dtype):
    """mma_ldmatrix_x4 (ldmatrix.sync.aligned.m8n8.x4.shared.b16): lane 8i + j supplies row j of
    matrix i; lane l receives in register i the 32-bit word l % 4 (elements 2(l % 4), +1) of the row
    lane 8i + l // 4 supplied. The probe's lanes address permuted rows (5l + 3 + w) % 32 of a 32 x 8
    matrix per warp w, so a fallback that mixes up providers, words or halves fails."""
    rng = np.random.default_rng(11)
    tiles = 3
    src = rng.standard_normal((tiles, 32, 8)).astype(DTYPES[dtype])
    out = np.full((tiles, 32, 8), np.nan, DTYPES[dtype])
    got = launch_probe(backend, PROBE, "probe_ldmatrix", dtype, tiles, [src, out])
    expected = np.empty_like(src)
    for w in range(tiles):
        supplied = [(5 * l + 3 + w) % 32 for l in range(32)]  # the row lane l addresses
        for lane in range(32):
            for i in range(4):
                row = supplied[8 * i + lane // 4]
                expected[w, lane, 2 * i:2 * i + 2] = src[w, row, 2 * (lane % 4):2 * (lane % 4) + 2]
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mma_probe_compiles_for_the_gpu(arch):
    """The inline-PTX path (not built on interpret) assembles for every target."""
    pytest.importorskip("nvidia.cuda_nvrtc", reason="pip install nvidia-cuda-nvrtc-cu12")
    from cuconv._nvrtc import compile_to_cubin

    for module in (PROBE, PROBE_TF32):
        result = compile_to_cubin(module.source(), module.name_expressions, arch=arch, program_name=module.filename)
        for name in module.name_expressions:
            assert result.resources[name].spill_stores == 0


# --- TF32: cvt.rna.tf32.f32 and mma m16n8k8 .tf32 ---

def tf32(a):
    """float32 values rounded to TF32 exactly as cvt.rna.tf32.f32 (10 explicit mantissa bits,
    nearest, ties away from zero; inf / NaN kept): + half a unit on the magnitude, truncate."""
    u = np.asarray(a, np.float32).view(np.uint32)
    finite = (u & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    rounded = (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(finite, rounded, u).astype(np.uint32).view(np.float32)


def tf32_by_arithmetic(a):
    """The same rounding written independently in float64 arithmetic (finite inputs): the two
    TF32 neighbours of v, the nearer one, the one farther from zero on a tie."""
    v = np.asarray(a, np.float32).astype(np.float64)
    _, exponent = np.frexp(np.abs(v))  # |v| = m * 2^exponent, m in [0.5, 1)
    unit = np.ldexp(1.0, np.maximum(exponent, -125) - 11)  # TF32 spacing (subnormals: float32's 2^-136 grid)
    low = np.trunc(v / unit) * unit  # toward zero
    high = low + np.sign(v) * unit
    nearer_high = np.abs(v - low) >= np.abs(high - v)  # ties (==) go away from zero
    out = np.copysign(np.where(nearer_high, high, low), v)  # rounding keeps the sign (of zero too)
    with np.errstate(over="ignore"):
        return out.astype(np.float32)


def tf32_tie_inputs():
    """float32 values on, just below and just above TF32 ties, both signs, even and odd
    neighbours (where round-to-nearest-even and ties-away differ), subnormals, and the
    largest finite value (rounds to inf)."""
    rng = np.random.default_rng(17)
    base = rng.integers(0x3E000000, 0x41000000, 48, dtype=np.uint32) & np.uint32(0xFFFFE000)
    bits = [base | np.uint32(0x1000), base | np.uint32(0x0FFF), base | np.uint32(0x1001),
            (base | np.uint32(0x2000)) | np.uint32(0x1000),  # odd TF32 neighbour below the tie
            np.array([0x00001000, 0x00003000, 0x00000FFF, 0x7F7FFFFF, 0x7F7FF000, 0], np.uint32)]
    positive = np.concatenate(bits).view(np.float32)
    return np.concatenate([positive, -positive, rng.standard_normal(64).astype(np.float32)])


def test_tf32_rounding_helper_matches_an_independent_definition():
    """The test-side tf32() (bit trick) against float64 arithmetic and hand-worked ties."""
    v = tf32_tie_inputs()
    assert np.array_equal(tf32(v).view(np.uint32), tf32_by_arithmetic(v).view(np.uint32))
    one_tie = np.float32(1 + 2.0**-11)  # halfway between 1 and 1 + 2^-10: away from zero (nearest-even: 1)
    assert tf32(one_tie) == np.float32(1 + 2.0**-10) and tf32(-one_tie) == -np.float32(1 + 2.0**-10)
    assert tf32(np.float32(1 + 2.0**-11 - 2.0**-23)) == 1.0
    assert np.isinf(tf32(np.finfo(np.float32).max))


def test_cvt_rna_tf32_rounding(backend):
    v = tf32_tie_inputs()
    inputs = np.concatenate([v, np.array([np.inf, -np.inf, np.nan], np.float32)])
    out = np.full_like(inputs, np.nan)
    got = launch_probe(backend, PROBE_TF32, "probe_tf32_round", "float32", inputs.size, [inputs, out])
    assert np.array_equal(got[:v.size].view(np.uint32), tf32(v).view(np.uint32))
    assert np.isposinf(got[-3]) and np.isneginf(got[-2]) and np.isnan(got[-1])


def run_tf32_probe(backend, a, b, c):
    d = np.full((a.shape[0], 16, 8), np.nan, np.float32)
    return launch_probe(backend, PROBE_TF32, "probe_mma_tf32", "float32", a.shape[0], [a, b, c, d])


def test_mma_m16n8k8_tf32_matches_rounded_a_times_b_plus_c(backend):
    rng = np.random.default_rng(8)
    tiles = 3
    a = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    b = rng.standard_normal((tiles, 8, 8)).astype(np.float32)
    c = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    d = run_tf32_probe(backend, a, b, c)
    expected = np.matmul(tf32(a).astype(np.float64), tf32(b).astype(np.float64)) + c.astype(np.float64)
    # tf32 products are exact in float32; only the float32 accumulation rounds
    assert np.abs(d - expected).max() <= 32 * np.finfo(np.float32).eps * np.abs(expected).max()
    unrounded = np.matmul(a.astype(np.float64), b.astype(np.float64)) + c.astype(np.float64)
    assert np.abs(d - unrounded).max() > 1e3 * np.finfo(np.float32).eps  # the operands really are TF32


def test_mma_m16n8k8_tf32_layout_and_ties_exactly():
    """With an identity on the other side every D element is one rounded operand: pins the
    A, B and D fragment positions and the ties-away rounding of both operands, exactly."""
    ties = tf32_tie_inputs()[:128].reshape(1, 16, 8)
    ties = np.where(np.abs(ties) < np.finfo(np.float32).max / 2, ties, 1.0).astype(np.float32)  # no inf
    zero = np.zeros((1, 16, 8), np.float32)
    d = run_tf32_probe("interpret", ties, np.eye(8, dtype=np.float32)[None], zero)
    assert np.array_equal(d, tf32(ties))  # D = tf32(A) @ I
    b = ties[:, 3:11]  # an 8 x 8 block of tie values
    a = np.concatenate([np.eye(8), np.eye(8)]).astype(np.float32)[None]  # rows m and m + 8 pick B's row m
    d = run_tf32_probe("interpret", a, np.ascontiguousarray(b), zero)
    assert np.array_equal(d, np.concatenate([tf32(b), tf32(b)], axis=1))


# --- conv2d through the implicit GEMM ---

def igemm_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, tf32=False):
    """conv2d(..., algorithm='implicit_gemm') (tf32: 'implicit_gemm_tf32') as conv2d() would dispatch it."""
    return conv2d_through(conv2d_implicit_gemm, x, w, b, stride, padding, dilation, groups, tf32=tf32)


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
    y = igemm_conv2d(*(to_backend(a, backend) for a in (x, w, b)), **params)
    got = to_numpy(y)
    assert got.dtype == DTYPES[dtype] and got.shape == ref.shape
    assert not np.isnan(got.astype(np.float64)).any()  # CUCONV_POISON: every element written
    # design §2: within twice the anchor's error (torch CPU conv2d in the same dtype)
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


def test_supported_reports_none_including_pixel_shuffled_output():
    geom = conv_geometry("conv2d", (1, 2, 5, 5), (8, 2, 3, 3), None, 1, 0, 1, 1)
    assert implicit_gemm_supported(geom, "float16") is None
    assert implicit_gemm_supported(geom, "bfloat16") is None
    from dataclasses import replace

    assert implicit_gemm_supported(replace(geom, upscale=2), "float16") is None  # subpixel_conv2d


def test_kernel_module_registered_for_half_types_and_tf32_float():
    assert KERNELS.dtypes == ("float16", "bfloat16", "float32")
    assert KERNELS.name_expressions == [f"{k}<{t}>" for k in ("conv2d_igemm_fwd", "conv2d_igemm_bwd_input",
                                                              "conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits",
                                                              "conv2d_igemm_dynamic_fwd", "conv2d_igemm_dynamic_bwd_input",
                                                              "conv2d_igemm64_fwd", "conv2d_igemm64_bwd_input",
                                                              "conv2d_igemm64_bwd_weight", "conv2d_igemm64_dynamic_fwd",
                                                              "conv2d_igemm64_dynamic_bwd_input")
                                        for t in ("__half", "__nv_bfloat16", "float")]


def test_public_api_runs_it_by_name(launches):
    """cuconv.conv2d(..., algorithm='implicit_gemm') runs this kernel and conv2d_backward
    by name runs dgrad + wgrad (when 'auto' does: tests/test_probes.py); an unsupported
    dtype is refused before any launch, forward and backward."""
    import cuconv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float16)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float16)
    y = cuconv.conv2d(x, w, padding=1, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_fwd"]
    assert rel_err(y, cuconv.conv2d(x, w, padding=1, algorithm="direct")) < 4 * unit_roundoff("float16")
    assert launches[-1] == "conv2d_fwd"
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

def igemm_conv2d_backward(gy, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, wrt=None, tf32=False):
    """conv2d_backward(..., algorithm='implicit_gemm') (tf32: 'implicit_gemm_tf32') as
    conv2d_backward() dispatches it."""
    return conv2d_backward_through(conv2d_implicit_gemm_gradients, gy, x, w, b, stride, padding, dilation, groups,
                                   wrt, tf32=tf32)


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
    grads = igemm_conv2d_backward(*(to_backend(a, backend) for a in (gy, x, w, b)), **params)
    assert (grads[2] is None) == (b is None)
    for name, got, anchor, ref in zip(("input", "weight", "bias"), grads, anchors, refs):
        if ref is None:
            continue
        got = to_numpy(got)
        assert got.dtype == DTYPES[dtype] and got.shape == ref.shape, name
        assert not np.isnan(got.astype(np.float64)).any(), name  # CUCONV_POISON: every element written
        # design §2: within twice the anchor's error (torch CPU autograd in the same dtype)
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
    assert allocations == [(w.shape, "bfloat16"), ((splits, 8, 3 * 3 * 3), "float32")]
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
    assert_wrt_subset(got, full, wrt)


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


# --- the launchers on explicit operands: dgrad with a bias (conv_transpose2d's forward) ---

# (x shape, w shape, params): dgrad's geometry; the bias is per INPUT channel
DGRAD_BIAS_CASES = [
    ((2, 6, 9, 10), (5, 6, 3, 3), dict(stride=2, padding=1)),          # stride phases
    ((1, 8, 7, 8), (6, 4, 3, 2), dict(stride=(1, 2), groups=2)),        # grouped: bias[g*Cin_g + n]
    ((1, 3, 2, 7), (4, 3, 3, 3), dict(stride=3, padding=1)),            # a phase with no pixel
    ((2, 4, 9, 8), (5, 4, 3, 3), dict(stride=2, padding=2, dilation=2)),  # tapless phases: bias only
]


def dgrad_with_bias(launcher, gy, w, bias, x_shape, **params):
    """launcher(call, geom, gy, w, bias, grad_x) on conv_geometry(x_shape, w.shape, params)."""
    call = Call("conv_transpose2d", input=gy, weight=w, bias=bias, optional=("bias",))
    p = {**dict(stride=1, padding=0, dilation=1, groups=1), **params}
    geom = conv_geometry("conv_transpose2d", x_shape, w.shape, None, p["stride"], p["padding"], p["dilation"],
                         p["groups"])
    grad_x = call.empty(x_shape)
    launcher(call, geom, call.operand("input"), call.operand("weight"), call.operand("bias"), grad_x)
    return call.export(grad_x), geom


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", DGRAD_BIAS_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_dgrad_bias_matches_direct_kernel_and_reference(backend, dtype, case):
    from cuconv.ops.conv2d import launch_grad_input

    x_shape, w_shape, params = case
    rng = np.random.default_rng(hash((x_shape, w_shape)) % 2**32)
    w = rng.standard_normal(w_shape).astype(DTYPES[dtype])
    bias = (4 * rng.standard_normal(x_shape[1])).astype(DTYPES[dtype])
    gy_shape = geometry(x_shape, w_shape, **params).output_shape
    gy = rng.standard_normal(gy_shape).astype(DTYPES[dtype])
    got, geom = dgrad_with_bias(launch_igemm_grad_input, *(to_backend(a, backend) for a in (gy, w, bias)), x_shape,
                                **params)
    got = to_numpy(got)
    assert got.dtype == DTYPES[dtype] and got.shape == x_shape
    assert not np.isnan(got.astype(np.float64)).any()  # CUCONV_POISON: every element written
    direct, _ = dgrad_with_bias(launch_grad_input, gy, w, bias, x_shape, **params)
    assert rel_err(got, direct.astype(np.float64)) <= 2 * unit_roundoff(dtype)
    # float64 reference: conv2d's input gradient plus the bias per input channel
    as64 = lambda a: a.astype(np.float64)  # noqa: E731
    x0 = np.zeros(x_shape)
    ref = reference.conv2d_backward(as64(gy), x0, as64(w), None, **params)[0] + as64(bias)[None, :, None, None]
    # design §2 anchor: torch's conv_transpose2d (the same dgrad + bias) in the same dtype
    stride, pad, dil = geom.stride, geom.pad, geom.dilation
    output_padding = tuple(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for n, o, s, p, d, k in
                           zip(x_shape[2:], gy_shape[2:], stride, pad, dil, w_shape[2:]))
    anchor, _ = torch_autograd(lambda g, ww, b: torch.nn.functional.conv_transpose2d(
        g, ww, b, stride=stride, padding=pad, output_padding=output_padding, groups=geom.groups, dilation=dil),
        [as64(gy), as64(w), as64(bias)], None, dtype)
    assert within_twice_anchor(got, anchor, ref, dtype), (rel_err(got, ref), rel_err(anchor, ref))


def test_dgrad_without_bias_is_unchanged_by_the_bias_path():
    """bias=None adds nothing: the launcher equals conv2d_implicit_gemm_gradients' dgrad bitwise."""
    gy, x, w, _ = backward_inputs(BACKWARD_CASES[1], "float16")
    got, _ = dgrad_with_bias(launch_igemm_grad_input, gy, w, None, x.shape, stride=2, padding=1)
    via_gradients = igemm_conv2d_backward(gy, x, w, stride=2, padding=1, wrt="input")[0]
    assert np.array_equal(got.view(np.uint16), via_gradients.view(np.uint16))


# --- pixel-shuffled output (geom.upscale > 1, subpixel_conv2d) ---

# (B, Cin, H, W, Cout, kh, kw, params, bias, r); Cout divisible by r^2
UPSCALE_CASES = [
    (2, 3, 7, 6, 8, 3, 3, dict(padding=1), True, 2),                    # Cout 8 -> 2 x (2x2)
    (1, 4, 9, 8, 18, 3, 2, dict(stride=2, padding=(1, 0)), False, 3),   # Cout 18 -> 2 x (3x3), stride 2
    (1, 6, 6, 7, 72, 1, 1, dict(groups=2), True, 2),                    # grouped, N 36 per group
    (2, 5, 5, 6, 9, 3, 3, dict(padding=2, dilation=2), True, 3),        # dilation, Cout = r^2
]


def upscale_call_and_geometry(op, case, arrays):
    batch, cin, h, w_, cout, kh, kw, params, with_bias, r = case
    call = Call(op, optional=("bias",), **arrays)
    p = {**dict(stride=1, padding=0, dilation=1, groups=1), **params}
    geom = conv_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"), p["stride"],
                         p["padding"], p["dilation"], p["groups"])
    return call, dataclasses.replace(geom, upscale=r)


def upscale_inputs(case, dtype):
    batch, cin, h, w_, cout, kh, kw, params, with_bias, r = case
    rng = np.random.default_rng(hash((batch, cin, h, w_, cout, r)) % 2**32)
    groups = params.get("groups", 1)
    x = rng.standard_normal((batch, cin, h, w_)).astype(DTYPES[dtype])
    w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(DTYPES[dtype])
    b = rng.standard_normal(cout).astype(DTYPES[dtype]) if with_bias else None
    shape = dataclasses.replace(geometry(x.shape, w.shape, **params), upscale=r).output_shape
    gy = rng.standard_normal(shape).astype(DTYPES[dtype])
    return gy, x, w, b


def upscale_forward(case, launcher, x, w, b):
    call, geom = upscale_call_and_geometry("subpixel_conv2d", case, dict(input=x, weight=w, bias=b))
    y = call.empty(geom.output_shape)
    launcher(call, geom, call.operand("input"), call.operand("weight"), call.operand("bias"), y)
    return call.export(y)


def upscale_gradients(case, gradients, gy, x, w, b):
    call, geom = upscale_call_and_geometry("subpixel_conv2d_backward", case,
                                           dict(input=x, grad_output=gy, weight=w, bias=b))
    return gradients(call, geom, frozenset(("input", "weight", "bias")), b is not None)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", UPSCALE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-r{c[9]}")
def test_pixel_shuffled_output_matches_direct_kernels_and_reference(backend, dtype, case):
    from cuconv.ops.conv2d import conv_gradients, launch_forward

    params, r = case[7], case[9]
    gy, x, w, b = upscale_inputs(case, dtype)
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    # float64 reference: pixel_shuffle of the reference conv; its gradients see the unshuffled gy
    refs = [shuffle_reference.pixel_shuffle(reference.conv2d(as64(x), as64(w), as64(b), **params), r),
            *reference.conv2d_backward(shuffle_reference.pixel_unshuffle(as64(gy), r), as64(x), as64(w), as64(b),
                                       **params)]
    conv = torch_conv(params)
    anchor_y, anchor_grads = torch_autograd(lambda *t: torch.nn.functional.pixel_shuffle(conv(*t), r),
                                            [as64(x), as64(w), as64(b)], as64(gy), dtype)
    on = [to_backend(a, backend) for a in (gy, x, w, b)]
    got = [upscale_forward(case, launch_igemm_forward, *on[1:]),
           *upscale_gradients(case, conv2d_implicit_gemm_gradients, *on)]
    direct = [upscale_forward(case, launch_forward, x, w, b), *upscale_gradients(case, conv_gradients, gy, x, w, b)]
    for name, mine, theirs, anchor, ref in zip(("output", "input", "weight", "bias"), got, direct,
                                               [anchor_y, *anchor_grads], refs):
        if ref is None:
            assert mine is None and b is None, name
            continue
        mine = to_numpy(mine)
        assert mine.dtype == DTYPES[dtype] and mine.shape == ref.shape, name
        assert not np.isnan(mine.astype(np.float64)).any(), name  # CUCONV_POISON: every element written
        # same fp32 accumulation as conv2d.cu's kernels on the same geometry: one rounding apart
        assert rel_err(mine, theirs.astype(np.float64)) <= 2 * unit_roundoff(dtype), name
        assert within_twice_anchor(mine, anchor, ref, dtype), (name, rel_err(mine, ref), rel_err(anchor, ref))


# --- float32 through TF32 (algorithm='implicit_gemm_tf32', tf32=True) ---

# (B, Cin, H, W, Cout, kh, kw, params, bias)
TF32_CASES = [
    (2, 3, 9, 11, 5, 3, 3, dict(padding=1), True),                       # odd sizes, K 27
    (2, 5, 11, 10, 70, 3, 3, dict(stride=2, padding=1), False),          # N 70; dgrad phases
    (1, 6, 9, 9, 10, 3, 3, dict(padding=1, groups=2), True),             # grouped
    (2, 12, 6, 7, 8, 3, 3, dict(padding=2, dilation=(1, 2)), True),      # K 108: 4 BK steps, tail 12
    (2, 3, 21, 19, 8, 3, 3, dict(padding=1), False),                     # wgrad split-K: 7 slices
]


@pytest.mark.parametrize("case", TF32_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}x{c[5]}x{c[6]}")
def test_tf32_matches_reference_on_tf32_rounded_inputs(backend, case):
    """The only error beyond float32's is the TF32 rounding of the GEMM operands, which the
    float64 reference already includes: within twice torch CPU float32's error on the same
    rounded inputs, plus four float32 units (the fp32 accumulation order differs)."""
    batch, cin, h, w_, cout, kh, kw, params, with_bias = case
    rng = np.random.default_rng(hash((batch, cin, h, w_, cout, "tf32")) % 2**32)
    groups = params.get("groups", 1)
    x = rng.standard_normal((batch, cin, h, w_)).astype(np.float32)
    w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    gy = rng.standard_normal(geometry(x.shape, w.shape, **params).output_shape).astype(np.float32)
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    xr, wr, gyr = (as64(tf32(a)) for a in (x, w, gy))
    # x, w, gy enter the mma rounded; the bias (forward) and the bias gradient (direct kernel) do not
    refs = [reference.conv2d(xr, wr, as64(b), **params), *reference.conv2d_backward(gyr, xr, wr, as64(b), **params)]
    anchor_y, anchor_grads = torch_autograd(torch_conv(params), [xr, wr, as64(b)], gyr, "float32")
    if b is not None:
        refs[3] = as64(gy).sum(axis=(0, 2, 3))
        anchor_grads[2] = torch_autograd(torch_conv(params), [xr, wr, as64(b)], as64(gy), "float32")[1][2]
    on = [to_backend(a, backend) for a in (gy, x, w, b)]
    got = [igemm_conv2d(*on[1:], **params, tf32=True), *igemm_conv2d_backward(*on, **params, tf32=True)]
    for name, mine, anchor, ref in zip(("output", "input", "weight", "bias"), got, [anchor_y, *anchor_grads], refs):
        if ref is None:
            assert mine is None, name
            continue
        mine = to_numpy(mine)
        assert mine.dtype == np.float32 and mine.shape == ref.shape, name
        assert not np.isnan(mine).any(), name  # CUCONV_POISON: every element written
        assert rel_err(mine, ref) <= 2 * rel_err(anchor, ref) + 4 * unit_roundoff("float32"), \
            (name, rel_err(mine, ref), rel_err(anchor, ref))


def test_tf32_is_not_float32_accuracy():
    """What the opt-in costs: against the unrounded float64 result the TF32 forward is off
    by about the TF32 input rounding (far more than float32), which is why it is opt-in."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    got = igemm_conv2d(x, w, padding=1, tf32=True)
    err = rel_err(got, reference.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1))
    assert 1e3 * unit_roundoff("float32") < err < 8 * 2.0**-11


def test_tf32_launchers_upscale_and_dgrad_bias():
    """The launchers take tf32 too: a pixel-shuffled forward and a dgrad with bias in TF32."""
    case = UPSCALE_CASES[0]
    _, x, w, b = upscale_inputs(case, "float32")
    y = upscale_forward(case, lambda *a: launch_igemm_forward(*a, tf32=True), x, w, b)
    ref = shuffle_reference.pixel_shuffle(reference.conv2d(*(tf32(a).astype(np.float64) for a in (x, w)),
                                                           b.astype(np.float64), **case[7]), case[9])
    assert rel_err(y, ref) <= 64 * unit_roundoff("float32")
    x_shape, w_shape, params = DGRAD_BIAS_CASES[1]
    rng = np.random.default_rng(9)
    w = rng.standard_normal(w_shape).astype(np.float32)
    bias = rng.standard_normal(x_shape[1]).astype(np.float32)
    gy = rng.standard_normal(geometry(x_shape, w_shape, **params).output_shape).astype(np.float32)
    got, _ = dgrad_with_bias(lambda *a: launch_igemm_grad_input(*a, tf32=True), gy, w, bias, x_shape, **params)
    ref = reference.conv2d_backward(tf32(gy).astype(np.float64), np.zeros(x_shape), tf32(w).astype(np.float64),
                                    None, **params)[0] + bias[None, :, None, None]
    assert rel_err(got, ref) <= 64 * unit_roundoff("float32")


def test_tf32_flag_and_dtype_must_agree(launches):
    """float32 needs tf32=True (algorithm='implicit_gemm_tf32'); tf32=True needs float32.
    Both refusals name the algorithm and launch nothing."""
    geom = conv_geometry("conv2d", (1, 2, 5, 5), (3, 2, 3, 3), None, 1, 0, 1, 1)
    assert implicit_gemm_supported(geom, "float32", tf32=True) is None
    assert implicit_gemm_supported(dataclasses.replace(geom, upscale=1), "float32", tf32=True) is None
    for dtype in ("float16", "bfloat16", "float64"):
        assert dtype in implicit_gemm_supported(geom, dtype, tf32=True)
    assert "implicit_gemm_tf32" in implicit_gemm_supported(geom, "float32")
    x32, w32 = np.ones((1, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32)
    x16, w16 = x32.astype(np.float16), w32.astype(np.float16)
    with pytest.raises(ValueError, match="algorithm='implicit_gemm' supports only float16 and bfloat16.*float32"):
        igemm_conv2d(x32, w32)
    with pytest.raises(ValueError, match="algorithm='implicit_gemm_tf32' supports only float32 inputs.*float16"):
        igemm_conv2d(x16, w16, tf32=True)
    with pytest.raises(ValueError, match="conv2d_backward: algorithm='implicit_gemm_tf32' supports only float32"):
        igemm_conv2d_backward(np.ones((1, 3, 3, 3), np.float16), x16, w16, tf32=True)
    with pytest.raises(ValueError, match="implicit_gemm_tf32"):
        dgrad_with_bias(lambda *a: launch_igemm_grad_input(*a, tf32=True), np.ones((1, 3, 3, 3), np.float16), w16,
                        None, x16.shape)
    call = Call("conv2d_backward", input=x32, grad_output=np.ones((1, 3, 3, 3), np.float32), weight=w32)
    with pytest.raises(ValueError, match="algorithm='implicit_gemm' supports only"):
        launch_igemm_grad_weight(call, geom, call.operand("grad_output"), call.operand("input"),
                                 call.empty(w32.shape))
    assert launches == []


def test_public_tf32_algorithm_and_auto_never_picks_it(launches, monkeypatch):
    """cuconv.conv2d / conv2d_backward(algorithm='implicit_gemm_tf32') run the float
    kernels (bitwise what the launchers give); no 'auto' candidate list, tuned or not,
    holds it, because TF32 weakens the float32 contract."""
    import cuconv
    from cuconv.ops.conv2d import CONV2D

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 5, 9, 8)).astype(np.float32)
    y = cuconv.conv2d(x, w, padding=1, algorithm="implicit_gemm_tf32")
    assert launches == ["conv2d_igemm_fwd"]
    np.testing.assert_array_equal(y, igemm_conv2d(x, w, padding=1, tf32=True))
    grads = cuconv.conv2d_backward(gy, x, w, padding=1, algorithm="implicit_gemm_tf32")
    for mine, theirs in zip(grads, igemm_conv2d_backward(gy, x, w, padding=1, tf32=True)):
        np.testing.assert_array_equal(mine, theirs)
    geom = conv_geometry("conv2d", x.shape, w.shape, None, 1, 1, 1, 1)
    monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", "pass")  # even where the tensor cores are verified
    verified = Call("conv2d", input=x, weight=w)
    assert "implicit_gemm_tf32" not in CONV2D.candidates(geom, "float32", call=verified)
    assert "implicit_gemm_tf32" not in CONV2D.candidates(geom, "float32", passes=True, call=verified)
    assert "implicit_gemm" in CONV2D.candidates(geom, "float16", call=verified)
    with pytest.raises(ValueError, match="implicit_gemm_tf32"):
        cuconv.conv2d(x.astype(np.float16), w.astype(np.float16), algorithm="implicit_gemm_tf32")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_conv_transpose2d_and_subpixel_by_implicit_gemm(dtype, launches):
    """conv_transpose2d's forward is the igemm dgrad (with its bias), its gradients the
    igemm forward and wgrad; subpixel_conv2d runs the pixel-shuffled igemm passes. Both
    within the design §2 rule of torch in the same dtype."""
    import functools

    import torch.nn.functional as F

    from conftest import assert_reduced_precision
    from cuconv.ops.conv_transpose2d import conv_transpose2d, conv_transpose2d_backward
    from cuconv.ops.subpixel import subpixel_conv2d, subpixel_conv2d_backward

    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 12, 5, 6)), rng.standard_normal((12, 3, 3, 3)), rng.standard_normal(6)
    params = dict(stride=2, padding=1, output_padding=1, groups=2)
    by_igemm = functools.partial(conv_transpose2d, algorithm="implicit_gemm")
    by_igemm_backward = functools.partial(conv_transpose2d_backward, algorithm="implicit_gemm")
    assert_reduced_precision(by_igemm, by_igemm_backward, reference_transpose.conv_transpose2d,
                             reference_transpose.conv_transpose2d_backward,
                             lambda *t: F.conv_transpose2d(*t, **params), (x, w, b), params, dtype, 3)
    assert {"conv2d_igemm_fwd", "conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight"} <= set(launches)
    assert not any(name.startswith("conv2d_fwd") or name == "conv2d_bwd_input" for name in launches)
    launches.clear()
    x, w, b = rng.standard_normal((2, 8, 6, 5)), rng.standard_normal((12, 8, 3, 3)), rng.standard_normal(12)
    params = dict(upscale_factor=2, padding=1)
    assert_reduced_precision(functools.partial(subpixel_conv2d, algorithm="implicit_gemm"),
                             functools.partial(subpixel_conv2d_backward, algorithm="implicit_gemm"),
                             reference_subpixel.subpixel_conv2d, reference_subpixel.subpixel_conv2d_backward,
                             lambda *t: F.pixel_shuffle(F.conv2d(*t, padding=1), 2), (x, w, b), params, dtype, 4)
    assert {"conv2d_igemm_fwd", "conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight"} <= set(launches)
    launches.clear()
    with pytest.raises(ValueError, match="algorithm must be 'auto' or one of"):
        subpixel_conv2d(x, w, algorithm="fft")
    with pytest.raises(ValueError, match="implicit_gemm"):
        conv_transpose2d(x, w[:8], algorithm="implicit_gemm")  # float64
    assert launches == []


# --- the loaders' division-free index walks, pinned exactly ---

# Edge radices for the incremental (compare-and-carry) k decodes: 1x1 (every tap digit of radix
# 1), KW = 2 (the A walk's step 2 equals the radix: kx step 0, ky step 1), KW = 1 / KH = 1,
# stride 3 x 2 with dilation (dgrad phases of 1 and 2 taps), grouped, K tails, several wgrad
# slices (the pixel walk crossing images), and a pixel-shuffled gy (upscale 3: the channel walk).
EXACT_CASES = [
    (2, 9, 7, 8, 5, 1, 1, dict(stride=1), 1),
    (2, 5, 9, 7, 6, 3, 2, dict(padding=1, dilation=(1, 2)), 1),
    (1, 4, 10, 9, 7, 1, 5, dict(padding=(0, 2), stride=(1, 2)), 1),
    (2, 3, 11, 10, 4, 5, 1, dict(stride=(3, 2), padding=(2, 0), dilation=(2, 1)), 1),
    (2, 6, 9, 11, 8, 3, 3, dict(stride=(3, 2), padding=1, groups=2), 1),
    (1, 4, 6, 5, 18, 3, 3, dict(padding=1, stride=2), 3),
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: f"{c[1]}-{c[4]}x{c[5]}x{c[6]}-r{c[8]}")
def test_index_walks_exact_on_integer_inputs(case):
    """Small-integer fp16 inputs keep every product and fp32 partial sum exact and every output an
    fp16-exact integer, so all three passes must equal the float64 reference EXACTLY: any wrong
    element in a staged tile (a carry off by one in the (c, ky, kx) / (o, jy, jx) / (b, oy, ox) walks,
    a wrong tap-table row, a wrong pixel-shuffled channel) shows."""
    from cuconv.ops.subpixel import subpixel_conv2d, subpixel_conv2d_backward

    batch, cin, h, w_, cout, kh, kw, params, r = case
    rng = np.random.default_rng(cin * 100 + cout)
    groups = params.get("groups", 1)
    x = rng.integers(-2, 3, (batch, cin, h, w_)).astype(np.float16)
    w = rng.integers(-2, 3, (cout, cin // groups, kh, kw)).astype(np.float16)
    as64 = lambda a: a.astype(np.float64)  # noqa: E731
    if r == 1:
        y = igemm_conv2d(x, w, **params)
        ref = reference.conv2d(as64(x), as64(w), None, **params)
        gy = rng.integers(-2, 3, ref.shape).astype(np.float16)
        gx, gw, _ = igemm_conv2d_backward(gy, x, w, **params)
        refs = reference.conv2d_backward(as64(gy), as64(x), as64(w), None, **params)
    else:
        y = subpixel_conv2d(x, w, upscale_factor=r, algorithm="implicit_gemm", **params)
        ref = reference_subpixel.subpixel_conv2d(as64(x), as64(w), None, upscale_factor=r, **params)
        gy = rng.integers(-2, 3, ref.shape).astype(np.float16)
        gx, gw, _ = subpixel_conv2d_backward(gy, x, w, upscale_factor=r, algorithm="implicit_gemm", **params)
        refs = reference_subpixel.subpixel_conv2d_backward(as64(gy), as64(x), as64(w), None, upscale_factor=r,
                                                           **params)
    assert np.abs(ref).max() <= 2048 and np.abs(refs[1]).max() <= 2048  # exact in fp16 and fp32
    np.testing.assert_array_equal(np.asarray(y).astype(np.float64), ref)
    np.testing.assert_array_equal(np.asarray(gx).astype(np.float64), refs[0])
    np.testing.assert_array_equal(np.asarray(gw).astype(np.float64), refs[1])


# --- INDEX32: 32-bit kernels where the host proves the bound, 64-bit twins otherwise ---

def test_index32_decision_from_the_shapes():
    """index32_safe: True for everyday shapes, False once any tensor (or the padded weight
    bound, or wgrad's workspace, or dynamic_conv2d's bank) reaches 2^31 elements."""
    from cuconv.ops.conv2d_igemm import index32_safe

    assert index32_safe(conv_geometry("conv2d", (256, 64, 56, 56), (64, 64, 3, 3), None, 1, 1, 1, 1))
    # x of 2^31 + elements (y too)
    assert not index32_safe(conv_geometry("conv2d", (1, 1, 46341, 46341), (1, 1, 1, 1), None, 1, 0, 1, 1))
    # y only: a 1-channel input to 2^31 / 2^20 output channels of 2^20 pixels
    assert not index32_safe(conv_geometry("conv2d", (1, 1, 1024, 1024), (2048, 1, 1, 1), None, 1, 0, 1, 1))
    # the weight only (x and y small): Cout * Cin_g * KH * KW padded past 2^31
    geom = conv_geometry("conv2d", (1, 16384, 1, 1), (16384, 16384, 3, 3), None, 1, 1, 1, 1)
    assert not index32_safe(geom)
    # dynamic_conv2d's bank of Kn expert kernels, and wgrad's workspace of S slices
    geom = conv_geometry("conv2d", (1, 2048, 4, 4), (2048, 2048, 3, 3), None, 1, 1, 1, 1)
    assert index32_safe(geom) and not index32_safe(geom, kernels=64) and not index32_safe(geom, splits=64)


INDEX32_CASES = [  # (batch, cin, h, w, cout, kh, kw, params, upscale)
    (2, 6, 9, 11, 10, 3, 3, dict(padding=1, stride=2, groups=2), 1),
    (1, 5, 7, 8, 66, 3, 2, dict(padding=(2, 1), dilation=(1, 2)), 1),
    (1, 4, 6, 5, 18, 3, 3, dict(padding=1), 3),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", INDEX32_CASES, ids=lambda c: f"{c[1]}-{c[4]}x{c[5]}x{c[6]}-r{c[8]}")
def test_index32_and_64_bit_kernels_bitwise_equal(case, dtype, monkeypatch, launches):
    """Every pass through the 32-bit kernels (the default here) and through the 64-bit twins (the host
    decision forced off) gives the same bits: the two index types form the same offsets."""
    import cuconv.ops.conv2d_igemm as igemm
    from cuconv.ops.dynamic_conv import dynamic_conv2d, dynamic_conv2d_backward
    from cuconv.ops.subpixel import subpixel_conv2d, subpixel_conv2d_backward

    batch, cin, h, w_, cout, kh, kw, params, r = case
    rng = np.random.default_rng(cin * 31 + cout)
    groups = params.get("groups", 1)
    x = rng.standard_normal((batch, cin, h, w_)).astype(DTYPES[dtype])
    w = rng.standard_normal((cout, cin // groups, kh, kw)).astype(DTYPES[dtype])
    b = rng.standard_normal(cout).astype(DTYPES[dtype])
    bank = rng.standard_normal((3, cout, cin // groups, kh, kw)).astype(DTYPES[dtype])
    att = rng.random((batch, 3)).astype(DTYPES[dtype])
    bank_bias = rng.standard_normal((3, cout)).astype(DTYPES[dtype])

    def run():
        if r == 1:
            y = igemm_conv2d(x, w, b, **params)
            gy = np.random.default_rng(7).standard_normal(y.shape).astype(DTYPES[dtype])
            out = [y, *igemm_conv2d_backward(gy, x, w, b, **params)]
            out.append(dynamic_conv2d(x, bank, att, bank_bias, algorithm="implicit_gemm", **params))
            out += dynamic_conv2d_backward(gy, x, bank, att, bank_bias, algorithm="implicit_gemm", **params)
        else:
            y = subpixel_conv2d(x, w, b, upscale_factor=r, algorithm="implicit_gemm", **params)
            gy = np.random.default_rng(7).standard_normal(y.shape).astype(DTYPES[dtype])
            out = [y, *subpixel_conv2d_backward(gy, x, w, b, upscale_factor=r, algorithm="implicit_gemm", **params)]
        return [np.asarray(a) for a in out if a is not None]

    narrow = run()
    assert {"conv2d_igemm_fwd", "conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight"} <= set(launches)
    assert not any("igemm64" in k for k in launches)
    launches.clear()
    monkeypatch.setattr(igemm, "index32_safe", lambda *a, **k: False)
    wide = run()
    assert {"conv2d_igemm64_fwd", "conv2d_igemm64_bwd_input", "conv2d_igemm64_bwd_weight"} <= set(launches)
    assert not any(k.startswith("conv2d_igemm_") and k != "conv2d_igemm_reduce_splits" for k in launches)
    if r == 1:
        assert {"conv2d_igemm64_dynamic_fwd", "conv2d_igemm64_dynamic_bwd_input"} <= set(launches)
    assert len(narrow) == len(wide) >= 4
    for a, c in zip(narrow, wide):
        assert not np.isnan(a.astype(np.float32)).any()
        assert a.dtype == c.dtype and np.array_equal(a.view(np.uint16), c.view(np.uint16))


def test_32_bit_kernel_refuses_params_without_index32(launches):
    """The 32-bit entry points compute nothing unless the host set index32 (the poisoned NaN output
    stays): a launcher that forgot the proof cannot silently wrap an offset."""
    import cuconv.ops.conv2d_igemm as igemm

    x = np.ones((1, 2, 5, 5), np.float16)
    w = np.ones((3, 2, 3, 3), np.float16)
    geom = conv_geometry("conv2d", x.shape, w.shape, None, 1, 1, 1, 1)
    call = Call("conv2d", input=x, weight=w)
    y = call.empty(geom.output_shape)
    params = dict(igemm._params(geom), index32=0)
    y.data[...] = np.nan
    call.launch(KERNELS, "conv2d_igemm_fwd", 1, 128, params, call.operand("input"), call.operand("weight"), None, y)
    assert np.isnan(np.asarray(call.export(y)).astype(np.float32)).all()
    call.launch(KERNELS, "conv2d_igemm_fwd", 1, 128, dict(params, index32=1), call.operand("input"),
                call.operand("weight"), None, y)
    assert (np.asarray(call.export(y)).astype(np.float32)[:, :, 1:-1, 1:-1] == 18).all()


def test_index32_and_64_bit_tf32_kernels_bitwise_equal(monkeypatch, launches):
    """The float (TF32) instantiations of both index widths: every pass, and the dynamic
    kernels through their launchers, give the same bits with the host decision forced off."""
    import cuconv.ops.conv2d_igemm as igemm

    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((10, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    params = dict(stride=2, padding=1, groups=2)
    gy = rng.standard_normal(geometry(x.shape, w.shape, **params).output_shape).astype(np.float32)
    bank = rng.standard_normal((3, 10, 3, 3, 3)).astype(np.float32)
    att = rng.random((2, 3)).astype(np.float32)
    geom = geometry(x.shape, w.shape, **params)

    def run():
        out = [igemm_conv2d(x, w, b, **params, tf32=True),
               *igemm_conv2d_backward(gy, x, w, b, **params, tf32=True)]
        call = Call("dynamic_conv2d_backward", input=x, grad_output=gy, weight=bank, attention=att)
        y = call.empty(geom.output_shape)
        igemm.launch_igemm_dynamic_forward(call, geom, call.operand("input"), call.operand("weight"),
                                           call.operand("attention"), None, y, tf32=True)
        gx = call.empty(x.shape)
        igemm.launch_igemm_dynamic_grad_input(call, geom, call.operand("grad_output"), call.operand("weight"),
                                              call.operand("attention"), gx, tf32=True)
        return [np.asarray(a) for a in out if a is not None] + [np.asarray(y.data), np.asarray(gx.data)]

    narrow = run()
    assert not any("igemm64" in k for k in launches)
    launches.clear()
    monkeypatch.setattr(igemm, "index32_safe", lambda *a, **k: False)
    wide = run()
    assert {"conv2d_igemm64_fwd", "conv2d_igemm64_bwd_input", "conv2d_igemm64_bwd_weight",
            "conv2d_igemm64_dynamic_fwd", "conv2d_igemm64_dynamic_bwd_input"} <= set(launches)
    assert len(narrow) == len(wide) == 6
    for a, c in zip(narrow, wide):
        assert a.dtype == np.float32 and not np.isnan(a).any()
        assert a.tobytes() == c.tobytes()
