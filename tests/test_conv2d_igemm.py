"""conv2d's algorithm='implicit_gemm' (cuconv/ops/conv2d_igemm.py, kernels_cu/conv2d_igemm.cu)
and the tensor-core helper it is built on (kernels_cu/common/mma.cuh).

The mma probe pins mma.cuh's host fallback to the PTX ISA m16n8k16 fragment layout on
interpret, and the real instruction to the same layout on cuda (when a GPU exists).
The conv is called through conv2d_implicit_gemm(call, geom) directly, with the Call
and geometry built as conv2d() builds them."""

import importlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from cuconv import _arrays, _interpret
from cuconv._kernels import KernelModule
from cuconv.ops._common import Call
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.conv2d_igemm import KERNELS, conv2d_implicit_gemm, implicit_gemm_supported
from conftest import DTYPES, rel_err, to_backend, to_numpy, torch_autograd, unit_roundoff

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
    assert KERNELS.name_expressions == ["conv2d_igemm_fwd<__half>", "conv2d_igemm_fwd<__nv_bfloat16>"]


def test_public_api_selects_it_only_on_request(launches):
    """cuconv.conv2d(..., algorithm='implicit_gemm') runs this kernel; 'auto' never does;
    an unsupported dtype is refused before any launch, forward and backward."""
    import cuconv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float16)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float16)
    y = cuconv.conv2d(x, w, padding=1, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_fwd"]
    assert rel_err(y, cuconv.conv2d(x, w, padding=1)) < 4 * unit_roundoff("float16")
    assert launches[-1] == "conv2d_fwd"  # 'auto' kept the direct kernel
    launches.clear()
    with pytest.raises(ValueError, match="implicit_gemm"):
        cuconv.conv2d(x.astype(np.float32), w.astype(np.float32), algorithm="implicit_gemm")
    with pytest.raises(ValueError, match="implicit_gemm"):
        cuconv.conv2d_backward(np.ones((2, 6, 7, 5), np.float32), x.astype(np.float32), w.astype(np.float32),
                               algorithm="implicit_gemm")
    assert launches == []
