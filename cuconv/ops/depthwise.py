"""conv2d's algorithm='depthwise': tiled depthwise kernels (groups == in_channels,
out_channels = in_channels * multiplier), forward and both gradients, for small (3..7)
and large (9..31) kernels. Kernels: kernels_cu/depthwise.cu (formulas, thread mapping,
the stride > 1 halo derivation); design and the GPU to-do list:
docs/kernels/depthwise.md. Not yet measured on a GPU.

Registered in conv2d's algorithm table (conv2d.CONV2D) as 'depthwise':
  depthwise_supported(geom, dtype) -> None, or a phrase completing "supports only ..."
  depthwise_forward(call, geom)                       (call: input, weight, bias)
  depthwise_gradients(call, geom, wanted, has_bias)   (call: grad_output, input, weight)

Tiles: a block item covers a tile_h x tile_w tile of pixels (output pixels for the
forward and the weight gradient, input pixels for the input gradient) and stages the
halo tile it reads in shared memory, in the accumulator type. The tile is the first of
_TILES (clipped to the plane) whose staged bytes fit _SHARED_BUDGET_BYTES (and the
device's per-block limit); when not even the last one fits (very large dilated
extents), the conv is unsupported here and the direct kernels remain.

Weight gradient: two stages, deterministic, no atomics. Stage 1 writes per-chunk
partial sums to a workspace ws[chunks, Cout, KH*KW] in the accumulator dtype; stage 2
adds the chunks in order. The (b, band of tile_h output rows) range is cut into
chunks = about ceil(_WGRAD_TARGET_BLOCKS / Cout) (at most the number of bands), a
choice that depends on the shape only, so the summation order is fixed. Workspace:
chunks * Cout * KH*KW * (4 or 8) bytes <= (_WGRAD_TARGET_BLOCKS + Cout) * KH*KW * 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._kernels import KernelModule
from ._algorithms import Algorithm
from ._common import Call, threads_for
from .conv2d import CONV2D, ConvGeometry, launch_grad_bias

KERNELS = KernelModule(
    "depthwise.cu",
    kernels=("depthwise_fwd", "depthwise_bwd_input", "depthwise_bwd_weight", "depthwise_reduce_chunks"),
    params_struct="DepthwiseParams",
)
DTYPES = ("float16", "bfloat16", "float32", "float64")
# Shared memory one block stages its tiles in: the per-block limit every NVIDIA GPU grants
# without an opt-in (the device's own limit is read and the smaller one used).
_SHARED_BUDGET_BYTES = 48 * 1024
# Tile shapes (rows, columns) tried in order; columns are a multiple of _OUT_PER_THREAD.
# The last one is the smallest tile worth running: below it the direct kernel remains.
_TILES = ((32, 32), (16, 32), (16, 16), (8, 16), (8, 8))
_OUT_PER_THREAD = KERNELS.constant("DEPTHWISE_OUT_PER_THREAD")
_TAPS_PER_THREAD = KERNELS.constant("DEPTHWISE_TAPS_PER_THREAD")
# The forward and input-gradient kernels give each thread exactly one group of
# _OUT_PER_THREAD outputs, so every tile's groups must fit one block (threads_for's 256).
assert all(h * w // _OUT_PER_THREAD <= 256 for h, w in _TILES), "a depthwise tile has more output groups than threads"
_WGRAD_THREADS = 256
# Weight gradient: stage-1 blocks (Cout * chunks) to aim for; decides the chunk count
# from the shape alone (never from the device), so the result is device-independent.
_WGRAD_TARGET_BLOCKS = 1024
_REDUCE_THREADS = 256


@dataclass(frozen=True)
class _Plan:
    tile_h: int
    tile_w: int
    halo_h: int
    halo_w: int
    pitch: int
    shared_entries: int  # accumulator-typed entries of dynamic shared memory
    threads: int


def _is_depthwise(geom: ConvGeometry) -> bool:
    return geom.groups == geom.in_channels and geom.out_channels % geom.in_channels == 0


def _pitch(halo_w: int) -> int:
    """Odd row pitch: with an odd stride the rows of one warp fall on different banks."""
    return halo_w if halo_w % 2 else halo_w + 1


def _plan(geom: ConvGeometry, kind: str, acc_bytes: int, budget: int) -> _Plan | None:
    """The first tile of _TILES whose staged bytes fit `budget`, for kind 'fwd', 'bwd_input'
    or 'bwd_weight'; None when even the smallest does not fit."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    kh, kw, taps = geom.kernel_h, geom.kernel_w, geom.kernel_h * geom.kernel_w
    rows, cols = (geom.in_h, geom.in_w) if kind == "bwd_input" else (geom.out_h, geom.out_w)
    r = _OUT_PER_THREAD
    for tile_h, tile_w in _TILES:
        th = max(1, min(tile_h, rows))
        tw = max(r, min(tile_w, -(-cols // r) * r))
        if kind == "bwd_input":  # the gy rows/columns the tile reaches (kernels_cu/depthwise.cu)
            hh, hw = (th - 1 + (kh - 1) * dh) // sh + 1, (tw - 1 + (kw - 1) * dw) // sw + 1
        else:
            hh, hw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
        pitch = _pitch(hw)
        if kind == "bwd_weight":
            tap_threads = min(taps, _WGRAD_THREADS)
            partial = (_WGRAD_THREADS // tap_threads) * tap_threads * _TAPS_PER_THREAD
            entries, threads = th * tw + hh * pitch + partial, _WGRAD_THREADS
        else:  # the output tile [th][tw + 1] overlays the halo once the sums are done
            entries, threads = taps + max(hh * pitch, th * (tw + 1)), threads_for(th * (tw // r))
        if entries * acc_bytes <= budget:
            return _Plan(th, tw, hh, hw, pitch, entries, threads)
    return None


def depthwise_supported(geom: ConvGeometry, dtype: str) -> str | None:
    """None when algorithm='depthwise' can run this conv (forward and both gradients) in
    `dtype`, else why not: a phrase that completes "supports only ..."."""
    if not _is_depthwise(geom):
        return (f"depthwise convolutions (groups == in_channels and out_channels a multiple of it; got "
                f"groups={geom.groups}, in_channels={geom.in_channels}, out_channels={geom.out_channels})")
    if geom.upscale != 1:
        return f"a plain (not pixel-shuffled) output (got upscale {geom.upscale})"
    if dtype not in DTYPES:
        return f"float16, bfloat16, float32 and float64 inputs (got {dtype})"
    acc_bytes = 8 if dtype == "float64" else 4
    for kind in ("fwd", "bwd_input", "bwd_weight"):
        if _plan(geom, kind, acc_bytes, _SHARED_BUDGET_BYTES) is None:
            extent = ((geom.kernel_h - 1) * geom.dilation[0] + 1, (geom.kernel_w - 1) * geom.dilation[1] + 1)
            return (f"kernels whose halo tile fits {_SHARED_BUDGET_BYTES} bytes of shared memory with an "
                    f"{_TILES[-1][0]}x{_TILES[-1][1]} tile (got a dilated extent {extent[0]}x{extent[1]}, "
                    f"stride {geom.stride}, {dtype})")
    return None


def _planned(call: Call, geom: ConvGeometry, kind: str) -> _Plan:
    budget = min(_SHARED_BUDGET_BYTES, call.max_shared_bytes())
    plan = _plan(geom, kind, call.accumulator_bytes, budget)
    if plan is None:  # only on a device granting less than the budget: checked up front otherwise
        raise ValueError(f"{call.op}: algorithm='depthwise': no tile fits the device's {budget} bytes of "
                         f"shared memory per block")
    return plan


def _params(geom: ConvGeometry, plan: _Plan, chunks: int = 0, bands_per_chunk: int = 1, tap_threads: int = 1,
            slices: int = 1) -> dict:
    return dict(geom.geometry_params(), multiplier=geom.out_channels // geom.in_channels, tile_h=plan.tile_h, tile_w=plan.tile_w,
                halo_h=plan.halo_h, halo_w=plan.halo_w, pitch=plan.pitch, chunks=chunks,
                bands_per_chunk=bands_per_chunk, tap_threads=tap_threads, slices=slices)


def _tiles(rows: int, cols: int, plan: _Plan) -> int:
    return -(-rows // plan.tile_h) * -(-cols // plan.tile_w)


def split_chunks(units: int, out_channels: int, target_blocks: int) -> tuple[int, int]:
    """(chunks, units_per_chunk) that cut `units` of weight-gradient work per channel into
    about target_blocks / out_channels chunks: a function of the shape only (the summation
    order must not depend on the device)."""
    if units == 0:
        return 0, 1
    target = min(units, max(1, -(-target_blocks // out_channels)))
    per_chunk = -(-units // target)
    return -(-units // per_chunk), per_chunk


def wgrad_chunks(geom: ConvGeometry, plan: _Plan) -> tuple[int, int]:
    """(chunks, bands_per_chunk) of the weight gradient's (b, band of tile_h rows) range."""
    return split_chunks(geom.batch * -(-geom.out_h // plan.tile_h), geom.out_channels, _WGRAD_TARGET_BLOCKS)


@dataclass(frozen=True)
class TiledKernels:
    """The launch sequence the CUDA-core kernels here and the tensor-core ones of
    depthwise_tc.py share: forward; input gradient; weight gradient into a per-chunk
    workspace then a fixed-order reduction; conv2d's bias gradient. What differs is
    named here."""

    module: KernelModule
    prefix: str              # kernels PREFIX_fwd, _bwd_input, _bwd_weight, _reduce_chunks
    check: Callable          # (op, geom, dtype): ValueError before any launch when unsupported
    planned: Callable        # (call, geom, kind) -> a plan with tile_h, tile_w, threads
    params: Callable         # (geom, plan) -> the params struct (forward, input gradient)
    wgrad_params: Callable   # (geom, plan, chunks, per_chunk) -> the params struct (weight gradient)
    wgrad_chunks: Callable   # (geom, plan) -> (chunks, per_chunk)
    shared_bytes: Callable   # (call, plan) -> dynamic shared memory per block
    workspace_dtype: Callable  # (call) -> the weight-gradient workspace's dtype

    def forward(self, call: Call, geom: ConvGeometry):
        """conv2d's forward; `call` holds input, weight and (optional) bias."""
        self.check(call.op, geom, call.dtype)
        plan = self.planned(call, geom, "fwd")
        y = call.empty(geom.output_shape)
        items = geom.batch * geom.out_channels * _tiles(geom.out_h, geom.out_w, plan)
        call.launch(self.module, self.prefix + "_fwd", items, plan.threads, self.params(geom, plan),
                    call.operand("input"), call.operand("weight"), call.operand("bias"), y,
                    shared_bytes=self.shared_bytes(call, plan))
        return call.export(y)

    def gradients(self, call: Call, geom: ConvGeometry, wanted, has_bias: bool):
        """(grad_input, grad_weight, grad_bias) as the caller's arrays (None where not
        wanted), conv2d.conv_gradients' contract; `call` holds grad_output, input, weight."""
        self.check(call.op, geom, call.dtype)
        plans = {kind: self.planned(call, geom, kind) for kind in ("bwd_input", "bwd_weight") if kind[4:] in wanted}
        gy = call.operand("grad_output")
        grad_input = grad_weight = grad_bias = None
        if "input" in wanted:
            plan = plans["bwd_input"]
            grad_input = call.empty((geom.batch, geom.in_channels, geom.in_h, geom.in_w))
            items = geom.batch * geom.in_channels * _tiles(geom.in_h, geom.in_w, plan)
            call.launch(self.module, self.prefix + "_bwd_input", items, plan.threads, self.params(geom, plan), gy,
                        call.operand("weight"), grad_input, shared_bytes=self.shared_bytes(call, plan))
        if "weight" in wanted:
            plan = plans["bwd_weight"]
            taps = geom.kernel_h * geom.kernel_w
            chunks, per_chunk = self.wgrad_chunks(geom, plan)
            params = self.wgrad_params(geom, plan, chunks, per_chunk)
            workspace = call.empty((chunks, geom.out_channels, taps), self.workspace_dtype(call))
            call.launch(self.module, self.prefix + "_bwd_weight", geom.out_channels * chunks, plan.threads, params,
                        gy, call.operand("input"), workspace, shared_bytes=self.shared_bytes(call, plan))
            grad_weight = call.empty(call.shape("weight"))
            call.launch(self.module, self.prefix + "_reduce_chunks", -(-geom.out_channels * taps // _REDUCE_THREADS),
                        _REDUCE_THREADS, params, workspace, grad_weight)
        if "bias" in wanted and has_bias:
            grad_bias = call.empty((geom.out_channels,))
            launch_grad_bias(call, geom, gy, grad_bias)
        return call.export(grad_input), call.export(grad_weight), call.export(grad_bias)


def _wgrad_params(geom: ConvGeometry, plan: _Plan, chunks: int, per_chunk: int) -> dict:
    tap_threads = min(geom.kernel_h * geom.kernel_w, _WGRAD_THREADS)
    return _params(geom, plan, chunks, per_chunk, tap_threads, _WGRAD_THREADS // tap_threads)


KERNEL_PATH = TiledKernels(KERNELS, "depthwise", lambda op, geom, dtype: DEPTHWISE.check(op, geom, dtype), _planned,
                           _params, _wgrad_params, wgrad_chunks,
                           lambda call, plan: plan.shared_entries * call.accumulator_bytes,
                           lambda call: "float64" if call.dtype == "float64" else "float32")
depthwise_forward = KERNEL_PATH.forward
depthwise_gradients = KERNEL_PATH.gradients

DEPTHWISE = CONV2D.register(Algorithm("depthwise", depthwise_supported, forward=depthwise_forward,
                                      gradients=depthwise_gradients, rank=1))
