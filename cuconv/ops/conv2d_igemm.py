"""conv2d's algorithm='implicit_gemm': the forward pass as an implicit GEMM on the
tensor cores (mma.sync m16n8k16, float16 / bfloat16 storage, float32 accumulation).

Opt-in only: conv2d dispatches here when called with algorithm='implicit_gemm' and
never picks it by itself ('auto' does not consider it). Kernel:
kernels_cu/conv2d_igemm.cu (GEMM mapping, tiles, fragment ownership and the H100
to-do list are documented there). Not yet measured on a GPU.

Supported: float16 / bfloat16 inputs, any stride / padding / dilation, groups >= 1
(each group is its own GEMM; grouped convs with few channels per group waste most of
a 64-wide N tile), no pixel-shuffled output (upscale 1). No workspace: the im2col
matrix is gathered tile by tile into shared memory. Backward: conv2d_backward's
kernels (kernels_cu/conv2d.cu), unchanged.
"""

from __future__ import annotations

from .._kernels import KernelModule
from ._common import Call
from .conv2d import ConvGeometry

KERNELS = KernelModule(
    "conv2d_igemm.cu",
    kernels=("conv2d_igemm_fwd",),
    params_struct="Conv2dIgemmParams",
    dtypes=("float16", "bfloat16"),
)
DTYPES = ("float16", "bfloat16")
# Must match kIgemmThreads / kIgemmBM / kIgemmBN in the .cu (the kernel assumes exactly
# this block size).
_THREADS = 128
_TILE_M = 64
_TILE_N = 64


def implicit_gemm_supported(geom: ConvGeometry, dtype: str) -> str | None:
    """None when algorithm='implicit_gemm' can run this conv in `dtype`, else why not
    (a phrase that completes "supports only ...")."""
    if dtype not in DTYPES:
        return f"float16 and bfloat16 inputs (got {dtype})"
    if geom.upscale != 1:
        return f"a plain (not pixel-shuffled) output (got upscale {geom.upscale})"
    return None


def check_implicit_gemm(op: str, geom: ConvGeometry, dtype: str) -> None:
    """ValueError naming algorithm='implicit_gemm' when it cannot run this conv."""
    why = implicit_gemm_supported(geom, dtype)
    if why is not None:
        raise ValueError(f"{op}: algorithm='implicit_gemm' supports only {why}")


def _params(geom: ConvGeometry) -> dict:
    return dict(batch=geom.batch, in_channels=geom.in_channels, in_h=geom.in_h, in_w=geom.in_w,
                out_channels=geom.out_channels, out_h=geom.out_h, out_w=geom.out_w,
                kernel_h=geom.kernel_h, kernel_w=geom.kernel_w,
                stride_h=geom.stride[0], stride_w=geom.stride[1], pad_h=geom.pad[0], pad_w=geom.pad[1],
                dilation_h=geom.dilation[0], dilation_w=geom.dilation[1], groups=geom.groups)


def conv2d_implicit_gemm(call: Call, geom: ConvGeometry):
    """conv2d's forward by implicit GEMM; `call` holds input, weight and (optional) bias,
    `geom` comes from conv_geometry. ValueError (before any launch) when unsupported."""
    check_implicit_gemm(call.op, geom, call.dtype)
    y = call.empty(geom.output_shape)
    m_tiles = -(-geom.batch * geom.out_h * geom.out_w // _TILE_M)
    n_tiles = -(-(geom.out_channels // geom.groups) // _TILE_N)
    call.launch(KERNELS, "conv2d_igemm_fwd", geom.groups * m_tiles * n_tiles, _THREADS, _params(geom),
                call.operand("input"), call.operand("weight"), call.operand("bias"), y)
    return call.export(y)
