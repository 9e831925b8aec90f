"""Depthwise conv2d on the tensor cores (issue 9): forward, input gradient and weight
gradient as banded (Toeplitz) GEMMs with mma.sync m16n8k16, float16 / bfloat16 storage
and float32 accumulation. Meant for large kernels (k >= 9 up to RepLKNet's 31), correct
for any k. Kernels: kernels_cu/depthwise_tc.cu (mapping, fragment ownership); design
note: docs/kernels/depthwise.md, section "Tensor-core path". Not yet run on a GPU.

conv2d(..., algorithm="implicit_gemm") is routed here for depthwise geometry; this
module exposes
  depthwise_tc_supported(geom, dtype) -> None, or a phrase completing "supports only ..."
  depthwise_tc_forward(call, geom)                      (call: input, weight, bias)
  depthwise_tc_gradients(call, geom, wanted, has_bias)  (call: grad_output, input, weight)

Supported: groups == in_channels with any multiplier (out_channels = in_channels * M),
stride 1, dilation 1, any padding, float16 / bfloat16, upscale 1, and kernels whose
tiles fit _SHARED_BUDGET_BYTES (every k up to 31, and beyond: see the tests).

Tiles (a shape-only choice): the forward and the input gradient cover tile_h x tile_w
pixels per block item (tile_h a multiple of 16, tile_w of 32; one warp per 16 x 32
block), the first of _TILES clipped to the plane whose shared memory fits; the weight
gradient walks tile_h x tile_w gy tiles (_WGRAD_TILES) with _WGRAD_WARPS warps.

Weight gradient: two stages, deterministic, no atomics. Stage 1 writes per-chunk fp32
partial sums ws[chunks, Cout, KH*KW]; stage 2 adds the chunks in order. The tiles of the
batch (B * ceil(Ho/tile_h) * ceil(Wo/tile_w), in order) are cut into chunks = about
ceil(_WGRAD_TARGET_BLOCKS / Cout) chunks (at most the number of tiles), so the
summation order depends on the shape only. Workspace: chunks * Cout * KH*KW * 4 bytes
<= (_WGRAD_TARGET_BLOCKS + Cout) * KH*KW * 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._kernels import KernelModule
from ._algorithms import refuse_unsupported
from ._common import Call
from .conv2d import ConvGeometry, launch_grad_bias
from .depthwise import TiledKernels, _is_depthwise, _tiles, split_chunks  # shared with the CUDA-core kernels

KERNELS = KernelModule(
    "depthwise_tc.cu",
    kernels=("depthwise_tc_fwd", "depthwise_tc_bwd_input", "depthwise_tc_bwd_weight", "depthwise_tc_reduce_chunks"),
    params_struct="DepthwiseTcParams",
    dtypes=("float16", "bfloat16"),
)
DTYPES = ("float16", "bfloat16")
# Shared memory per block: the limit every GPU grants without an opt-in (the device's
# own limit is read and the smaller one used).
_SHARED_BUDGET_BYTES = 48 * 1024
# Forward / input-gradient tiles (rows, columns), tried in order: rows a multiple of 16
# (one mma row block per warp), columns of 32 (four n blocks of 8 per warp).
_TILES = ((32, 64), (32, 32), (16, 32))
# Weight-gradient gy tiles (rows, columns), tried in order, and warps per block.
_WGRAD_TILES = ((16, 64), (16, 32), (8, 32))
_WGRAD_WARPS = 4
# Stage-1 blocks (Cout * chunks) to aim for: fixes the chunk count from the shape alone.
_WGRAD_TARGET_BLOCKS = 1024
_REDUCE_THREADS = 256
_MARGIN = KERNELS.constant("DWTC_MARGIN")  # zero columns left of a staged weight / gy row
_WGRAD_PAIRS = KERNELS.constant("DWTC_WGRAD_PAIRS")  # accumulator tiles per weight-gradient warp and pass
_ELEMENT_BYTES = 2  # float16 / bfloat16 tiles in shared memory


@dataclass(frozen=True)
class _Plan:
    tile_h: int
    tile_w: int
    span: int       # staged halo columns
    pitch: int      # halo row pitch
    wlen: int       # weight row copy length (fwd / bwd_input) or gy row pitch (bwd_weight)
    halo_rows: int
    shared_bytes: int
    threads: int


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _plan(geom: ConvGeometry, kind: str, budget: int) -> _Plan | None:
    """The first tile whose shared memory fits `budget`, for kind 'fwd', 'bwd_input' or
    'bwd_weight' (layouts in kernels_cu/depthwise_tc.cu); None when none fits."""
    kh, kw = geom.kernel_h, geom.kernel_w
    if kind == "bwd_weight":
        for tile_h, tile_w in _WGRAD_TILES:
            th, tw = max(1, min(tile_h, geom.out_h)), max(16, min(tile_w, _round_up(geom.out_w, 16)))
            span = _round_up(tw + kw - 1, 16)
            pitch, gpitch, rows = span + 8, span + 24, th + _round_up(kh, 16) - 1
            staged = (rows * pitch + 2 * th * gpitch) * _ELEMENT_BYTES
            reduction = _WGRAD_WARPS * _WGRAD_PAIRS * 32 * 4 * 4  # fp32 fragments of every warp
            shared = max(staged, reduction)
            if shared <= budget:
                return _Plan(th, tw, span, pitch, gpitch, rows, shared, 32 * _WGRAD_WARPS)
        return None
    rows, cols = (geom.in_h, geom.in_w) if kind == "bwd_input" else (geom.out_h, geom.out_w)
    for tile_h, tile_w in _TILES:
        th, tw = max(16, min(tile_h, _round_up(rows, 16))), max(32, min(tile_w, _round_up(cols, 32)))
        span = _round_up(tw + kw - 1, 16)
        pitch, wlen, halo_rows = span + 8, _round_up(kw + 40, 2), th + kh - 1
        shared = (halo_rows * pitch + 2 * kh * wlen) * _ELEMENT_BYTES
        if shared <= budget:
            return _Plan(th, tw, span, pitch, wlen, halo_rows, shared, 32 * (th // 16) * (tw // 32))
    return None


def depthwise_tc_supported(geom: ConvGeometry, dtype: str) -> str | None:
    """None when the tensor-core depthwise kernels can run this conv (forward and both
    gradients) in `dtype`, else why not: a phrase that completes "supports only ..."."""
    if not _is_depthwise(geom):
        return (f"depthwise convolutions on the tensor cores (groups == in_channels and out_channels a "
                f"multiple of it; got groups={geom.groups}, in_channels={geom.in_channels}, "
                f"out_channels={geom.out_channels})")
    if dtype not in DTYPES:
        return f"float16 and bfloat16 inputs for depthwise convolutions (got {dtype})"
    if geom.stride != (1, 1) or geom.dilation != (1, 1):
        return (f"stride 1 and dilation 1 for depthwise convolutions (got stride {geom.stride}, "
                f"dilation {geom.dilation})")
    if geom.upscale != 1:
        return f"a plain (not pixel-shuffled) output (got upscale {geom.upscale})"
    for kind in ("fwd", "bwd_input", "bwd_weight"):
        if _plan(geom, kind, _SHARED_BUDGET_BYTES) is None:
            return (f"depthwise kernels whose tiles fit {_SHARED_BUDGET_BYTES} bytes of shared memory "
                    f"(got a {geom.kernel_h}x{geom.kernel_w} kernel)")
    return None


def check_depthwise_tc(op: str, geom: ConvGeometry, dtype: str) -> None:
    """ValueError naming algorithm='implicit_gemm' (the algorithm that routes here) when
    these kernels cannot run this conv."""
    refuse_unsupported(op, "implicit_gemm", depthwise_tc_supported(geom, dtype))


def _planned(call: Call, geom: ConvGeometry, kind: str) -> _Plan:
    budget = min(_SHARED_BUDGET_BYTES, call.max_shared_bytes())
    plan = _plan(geom, kind, budget)
    if plan is None:  # only on a device granting less than the budget: checked up front otherwise
        raise ValueError(f"{call.op}: algorithm='implicit_gemm': no depthwise tile fits the device's {budget} "
                         f"bytes of shared memory per block")
    return plan


def _params(geom: ConvGeometry, plan: _Plan, chunks: int = 0, tiles_per_chunk: int = 1) -> dict:
    return dict(batch=geom.batch, in_channels=geom.in_channels, in_h=geom.in_h, in_w=geom.in_w,
                out_channels=geom.out_channels, out_h=geom.out_h, out_w=geom.out_w,
                kernel_h=geom.kernel_h, kernel_w=geom.kernel_w, pad_h=geom.pad[0], pad_w=geom.pad[1],
                multiplier=geom.out_channels // geom.in_channels, tile_h=plan.tile_h, tile_w=plan.tile_w,
                span=plan.span, pitch=plan.pitch, wlen=plan.wlen, halo_rows=plan.halo_rows, chunks=chunks,
                tiles_per_chunk=tiles_per_chunk)


def wgrad_chunks(geom: ConvGeometry, plan: _Plan) -> tuple[int, int]:
    """(chunks, tiles_per_chunk) of the weight gradient's tile range: a function of the
    shape only (the summation order must not depend on the device)."""
    return split_chunks(geom.batch * _tiles(geom.out_h, geom.out_w, plan), geom.out_channels, _WGRAD_TARGET_BLOCKS)


# grad_input: depthwise_tc_bwd_input, no workspace. grad_weight: depthwise_tc_bwd_weight
# into a float32 workspace [chunks, Cout, KH*KW] (wgrad_chunks), then
# depthwise_tc_reduce_chunks in chunk order (bitwise reproducible). grad_bias: conv2d's
# direct reduction kernel.
TENSOR_CORE_PATH = TiledKernels(KERNELS, "depthwise_tc", check_depthwise_tc, _planned, _params, _params, wgrad_chunks,
                                lambda call, plan: plan.shared_bytes, lambda call: "float32")
depthwise_tc_forward = TENSOR_CORE_PATH.forward
depthwise_tc_gradients = TENSOR_CORE_PATH.gradients
