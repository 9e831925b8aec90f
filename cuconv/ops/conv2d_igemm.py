"""conv2d's algorithm='implicit_gemm': the forward pass, the input gradient (dgrad) and
the weight gradient (wgrad) as implicit GEMMs on the tensor cores (mma.sync m16n8k16,
float16 / bfloat16 storage, float32 accumulation).

Opt-in only: conv2d / conv2d_backward dispatch here when called with
algorithm='implicit_gemm' and never pick it by themselves ('auto' does not consider
it). Kernels: kernels_cu/conv2d_igemm.cu (GEMM mappings, tiles, fragment ownership);
design note and GPU to-do list: docs/kernels/implicit_gemm.md. Not yet measured on a
GPU.

Supported: float16 / bfloat16 inputs, any stride / padding / dilation, groups >= 1
(each group is its own GEMM; grouped convs with few channels per group waste most of
a 64-wide tile), no pixel-shuffled output (upscale 1).

Memory: the forward and dgrad allocate only their output (the im2col / gathered
grad_output matrices are staged tile by tile in shared memory; dgrad runs one dense
sub-GEMM per stride phase, so it multiplies no structural zeros). wgrad uses a
deterministic split-K: a float32 workspace of S * Cout * Cin_g*KH*KW * 4 bytes
(S = wgrad_split(geom)[0] <= 64 K slices, fixed by the shape) holding each slice's
partial sums, reduced in fixed slice order by conv2d_igemm_reduce_splits; results are
bitwise reproducible for a given shape. The bias gradient is conv2d's direct
reduction kernel (conv2d.launch_grad_bias).
"""

from __future__ import annotations

from .._kernels import KernelModule
from ._common import Call
from .conv2d import ConvGeometry, launch_grad_bias

KERNELS = KernelModule(
    "conv2d_igemm.cu",
    kernels=("conv2d_igemm_fwd", "conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits"),
    params_struct="Conv2dIgemmParams",
    dtypes=("float16", "bfloat16"),
)
DTYPES = ("float16", "bfloat16")
# Must match kIgemmThreads / kIgemmBM / kIgemmBN in the .cu (the kernel assumes exactly
# this block size).
_THREADS = 128
_TILE_M = 64
_TILE_N = 64
_TILE_K = 32  # kIgemmBK
# wgrad split-K rule (a shape-only choice, so results are reproducible for a shape;
# UNMEASURED, a starting point for a GPU session): aim for _SPLIT_TARGET_ITEMS work
# items (about two waves on an H100's 132 SMs), each slice at least _SPLIT_MIN_STEPS
# BK steps, at most _SPLIT_MAX slices (bounds the workspace to 64 fp32 copies of grad_w).
_SPLIT_TARGET_ITEMS = 2 * 132
_SPLIT_MIN_STEPS = 4
_SPLIT_MAX = 64
_REDUCE_THREADS = 256


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


def _params(geom: ConvGeometry, splits: int = 1, split_steps: int = 0) -> dict:
    return dict(batch=geom.batch, in_channels=geom.in_channels, in_h=geom.in_h, in_w=geom.in_w,
                out_channels=geom.out_channels, out_h=geom.out_h, out_w=geom.out_w,
                kernel_h=geom.kernel_h, kernel_w=geom.kernel_w,
                stride_h=geom.stride[0], stride_w=geom.stride[1], pad_h=geom.pad[0], pad_w=geom.pad[1],
                dilation_h=geom.dilation[0], dilation_w=geom.dilation[1], groups=geom.groups,
                splits=splits, split_steps=split_steps)


def _tiles(n: int, tile: int) -> int:
    return -(-n // tile)


def wgrad_split(geom: ConvGeometry) -> tuple[int, int]:
    """(S, steps): wgrad's K = B*Ho*Wo is cut into S slices of `steps` BK steps each (the
    last one possibly shorter, none empty), chosen from the shape alone. The workspace is
    S * Cout * Cin_g*KH*KW float32 values."""
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    tiles = geom.groups * _tiles(cout_g, _TILE_M) * _tiles(cin_g * geom.kernel_h * geom.kernel_w, _TILE_N)
    k_steps = _tiles(geom.batch * geom.out_h * geom.out_w, _TILE_K)
    wanted = min(_tiles(_SPLIT_TARGET_ITEMS, tiles), _tiles(k_steps, _SPLIT_MIN_STEPS), _SPLIT_MAX)
    steps = max(1, _tiles(k_steps, max(1, wanted)))
    return max(1, _tiles(k_steps, steps)), steps


def conv2d_implicit_gemm(call: Call, geom: ConvGeometry):
    """conv2d's forward by implicit GEMM; `call` holds input, weight and (optional) bias,
    `geom` comes from conv_geometry. ValueError (before any launch) when unsupported."""
    check_implicit_gemm(call.op, geom, call.dtype)
    y = call.empty(geom.output_shape)
    m_tiles = _tiles(geom.batch * geom.out_h * geom.out_w, _TILE_M)
    n_tiles = _tiles(geom.out_channels // geom.groups, _TILE_N)
    call.launch(KERNELS, "conv2d_igemm_fwd", geom.groups * m_tiles * n_tiles, _THREADS, _params(geom),
                call.operand("input"), call.operand("weight"), call.operand("bias"), y)
    return call.export(y)


def conv2d_implicit_gemm_gradients(call: Call, geom: ConvGeometry, wanted, has_bias: bool):
    """(grad_input, grad_weight, grad_bias) of conv2d by implicit GEMM, as the caller's
    arrays (None where not in `wanted` or, for the bias, without one): the contract of
    conv2d.conv_gradients. `call` holds grad_output, input and weight; ValueError before
    any launch when algorithm='implicit_gemm' cannot run this conv.

    grad_input: conv2d_igemm_bwd_input, no workspace; for stride > 1 it runs one dense
    sub-GEMM per stride phase (SH*SW of them), so no structural zeros are multiplied.
    grad_weight: conv2d_igemm_bwd_weight into a float32 workspace [S, Cout, Cin_g*KH*KW]
    (S * Cout * Cin_g*KH*KW * 4 bytes, S = wgrad_split(geom)[0]), then
    conv2d_igemm_reduce_splits (fixed slice order: bitwise reproducible). grad_bias:
    conv2d's direct reduction kernel."""
    check_implicit_gemm(call.op, geom, call.dtype)
    gy = call.operand("grad_output")
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    taps = geom.kernel_h * geom.kernel_w
    grad_input = grad_weight = grad_bias = None
    if "input" in wanted:
        grad_input = call.empty((geom.batch, geom.in_channels, geom.in_h, geom.in_w))
        # (group, stride phase, m tile, n tile); m tiles of the largest phase (see the .cu)
        sh, sw = geom.stride
        phase_pixels = geom.batch * _tiles(geom.in_h, sh) * _tiles(geom.in_w, sw)
        items = geom.groups * sh * sw * _tiles(phase_pixels, _TILE_M) * _tiles(cin_g, _TILE_N)
        call.launch(KERNELS, "conv2d_igemm_bwd_input", items, _THREADS, _params(geom),
                    gy, call.operand("weight"), grad_input)
    if "weight" in wanted:
        splits, steps = wgrad_split(geom)
        params = _params(geom, splits, steps)
        workspace = call.empty((splits, geom.out_channels, cin_g * taps), "float32")
        items = geom.groups * splits * _tiles(cout_g, _TILE_M) * _tiles(cin_g * taps, _TILE_N)
        call.launch(KERNELS, "conv2d_igemm_bwd_weight", items, _THREADS, params,
                    gy, call.operand("input"), workspace)
        grad_weight = call.empty(call.shape("weight"))
        call.launch(KERNELS, "conv2d_igemm_reduce_splits", _tiles(grad_weight.data.size, _REDUCE_THREADS),
                    _REDUCE_THREADS, params, workspace, grad_weight)
    if "bias" in wanted and has_bias:
        grad_bias = call.empty((geom.out_channels,))
        launch_grad_bias(call, geom, gy, grad_bias)
    return call.export(grad_input), call.export(grad_weight), call.export(grad_bias)
