"""involution2d (Li et al., CVPR 2021): a per-pixel, per-group kernel shared by the
group's channels, forward and hand-written backward.

The kernel is an argument (generated outside the op, e.g. by the layer's own small
conv network): kernel [B, G, kh, kw, Ho, Wo], channel c of input [B, C, H, W] uses
group c // (C // G). Kernels: kernels_cu/involution.cu (formulas and thread mapping
are documented there); shapes are runtime parameters, so one compile per dtype serves
every layer (unlike the official CuPy kernels, which are compiled per shape).

Forward: ONE launch of `involution2d_fwd`, whose block stages a tile of the kernel and
the input halo of a chunk of the group's channels in shared memory; the output is the
only array allocated. The tile (TH x TW output pixels) and the chunk are planned on the
host to fit `_SHARED_BUDGET_BYTES` (and the device's own per-block limit); when not even
a 1x1 tile of one channel fits (a window beyond ~6000 accumulators, e.g. a 7x7 kernel
with dilation 13 in float64), `involution2d_direct_fwd` reads device memory directly.

Backward: grad_input as a gather (`involution2d_bwd_input`) and grad_kernel as a
reduction over the group's channels (`involution2d_bwd_kernel`), each element written
by one thread in a fixed order: no atomics, bitwise deterministic. Only the returned
gradients are allocated.
"""

from __future__ import annotations

import functools

from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import Call, check_grad_output, int_pair, parse_wrt, threads_for
from .conv2d import conv_output_size

KERNELS = KernelModule(
    "involution.cu",
    kernels=("involution2d_fwd", "involution2d_direct_fwd", "involution2d_bwd_input", "involution2d_bwd_kernel"),
    params_struct="InvolutionParams",
)
# Shared memory one forward block stages its tiles in: the per-block limit every NVIDIA
# GPU grants without an opt-in (the device's own limit is read and the smaller used).
# Tests shrink it to force small tiles and the direct fallback.
_SHARED_BUDGET_BYTES = 48 * 1024
# Largest forward tile: output pixels of one block item, and its widest row.
_MAX_TILE_PIXELS = 128
_MAX_TILE_W = 16
# Largest channel chunk of a forward block item (RedNet's groups have 16 channels).
_MAX_CHUNK = 16
_CHANNELS_PER_THREAD = KERNELS.constant("INVOLUTION_CHANNELS_PER_THREAD")
_TAPS_PER_THREAD = KERNELS.constant("INVOLUTION_TAPS_PER_THREAD")
_MAX_THREADS = 256

NAMES = ("input", "kernel")


class Geometry:
    """Shapes and parameters of one involution2d call, checked."""

    def __init__(self, op: str, call: Call, stride, padding, dilation):
        x_shape, k_shape = call.shape("input"), call.shape("kernel")
        shapes = f"(input {x_shape}, kernel {k_shape})"
        if len(x_shape) != 4:
            raise ValueError(f"{op}: input must be 4-D [batch, channels, height, width], got shape {x_shape}")
        if len(k_shape) != 6:
            raise ValueError(f"{op}: kernel must be 6-D [batch, groups, kh, kw, out_h, out_w], got shape {k_shape}")
        self.stride = int_pair(op, "stride", stride, 1)
        self.pad = int_pair(op, "padding", padding, 0)
        self.dilation = int_pair(op, "dilation", dilation, 1)
        self.batch, self.channels, self.in_h, self.in_w = x_shape
        kb, self.groups, self.kernel_h, self.kernel_w, kho, kwo = k_shape
        if self.channels < 1:
            raise ValueError(f"{op}: input has no channels {shapes}")
        if kb != self.batch:
            raise ValueError(f"{op}: kernel's batch {kb} does not match input's batch {self.batch} {shapes}")
        if self.groups < 1 or self.channels % self.groups:
            raise ValueError(f"{op}: input's channels={self.channels} must be divisible by kernel's "
                             f"groups={self.groups} {shapes}")
        if min(self.kernel_h, self.kernel_w) < 1:
            raise ValueError(f"{op}: kernel has an empty window kh={self.kernel_h}, kw={self.kernel_w} {shapes}")
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dilation
        extent = (dh * (self.kernel_h - 1) + 1, dw * (self.kernel_w - 1) + 1)
        padded = (self.in_h + 2 * ph, self.in_w + 2 * pw)
        if extent[0] > padded[0] or extent[1] > padded[1]:
            raise ValueError(f"{op}: kernel window (dilated extent {extent[0]}x{extent[1]}) is larger than the "
                             f"padded input {padded[0]}x{padded[1]} {shapes}, padding {self.pad}, "
                             f"dilation {self.dilation}")
        self.out_h = conv_output_size(self.in_h, self.kernel_h, sh, ph, dh)
        self.out_w = conv_output_size(self.in_w, self.kernel_w, sw, pw, dw)
        if (kho, kwo) != (self.out_h, self.out_w):
            raise ValueError(f"{op}: kernel's last two dims must be the output size ({self.out_h}, {self.out_w}) "
                             f"of input {x_shape} with a {self.kernel_h}x{self.kernel_w} window, stride "
                             f"{self.stride}, padding {self.pad}, dilation {self.dilation}; got ({kho}, {kwo}) "
                             f"{shapes}")

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.out_h, self.out_w)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.in_h, self.in_w)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.batch, self.groups, self.kernel_h, self.kernel_w, self.out_h, self.out_w)

    def spans(self, tile_h: int, tile_w: int) -> tuple[int, int]:
        """Input rows x columns a tile_h x tile_w output tile reads (its halo)."""
        return ((tile_h - 1) * self.stride[0] + (self.kernel_h - 1) * self.dilation[0] + 1,
                (tile_w - 1) * self.stride[1] + (self.kernel_w - 1) * self.dilation[1] + 1)

    def params(self, tile_h: int = 0, tile_w: int = 0, chunk: int = 0) -> dict:
        span_h, span_w = self.spans(tile_h, tile_w) if tile_h else (0, 0)
        return dict(batch=self.batch, channels=self.channels, in_h=self.in_h, in_w=self.in_w, groups=self.groups,
                    out_h=self.out_h, out_w=self.out_w, kernel_h=self.kernel_h, kernel_w=self.kernel_w,
                    stride_h=self.stride[0], stride_w=self.stride[1], pad_h=self.pad[0], pad_w=self.pad[1],
                    dilation_h=self.dilation[0], dilation_w=self.dilation[1], tile_h=tile_h, tile_w=tile_w,
                    chunk=chunk, span_h=span_h, span_w=span_w)


# --- forward planning ---

def shared_entries(geom: Geometry, tile_h: int, tile_w: int, chunk: int) -> int:
    """Accumulators a forward block stages: the tile's kernel plus the chunk's halos."""
    span_h, span_w = geom.spans(tile_h, tile_w)
    return geom.kernel_h * geom.kernel_w * tile_h * tile_w + chunk * span_h * span_w


def forward_plan(call: Call, geom: Geometry) -> tuple[int, int, int] | None:
    """(tile_h, tile_w, chunk) of involution2d_fwd, or None when not even a 1x1 tile of
    one channel fits the shared-memory budget (the direct fallback)."""
    budget = min(_SHARED_BUDGET_BYTES, call.max_shared_bytes()) // call.accumulator_bytes
    return _plan(geom.out_h, geom.out_w, geom.channels // geom.groups, geom.kernel_h, geom.kernel_w,
                 geom.stride, geom.dilation, budget)


@functools.lru_cache(maxsize=256)
def _plan(out_h, out_w, cg, kernel_h, kernel_w, stride, dilation, budget):
    """The plan that fits `budget` accumulators and loads the fewest elements from device
    memory per output element: taps / chunk (the tile's kernel, shared by the chunk's
    channels) + span_h * span_w / (tile_h * tile_w) (the halo, shared by the tile's
    pixels). Tiles of at most 128 pixels in rows of at most 16 (whole warps of
    consecutive pixels where the plane allows), chunks of at most 16 channels in whole
    R-channel groups; ties go to the wider tile, then the larger one."""
    taps = kernel_h * kernel_w
    r = _CHANNELS_PER_THREAD
    widths = sorted({min(out_w, _MAX_TILE_W) >> s for s in range(5)} - {0}, reverse=True)
    chunks = sorted({min(cg, _MAX_CHUNK)} | {c for c in range(r, min(cg, _MAX_CHUNK), r)} | set(range(1, min(cg, r))),
                    reverse=True)
    best, best_cost = None, None
    for tile_w in widths:
        cap = min(out_h, max(1, _MAX_TILE_PIXELS // tile_w))
        for tile_h in sorted({cap} | {1 << s for s in range(8) if 1 << s < cap}, reverse=True):
            span_h = (tile_h - 1) * stride[0] + (kernel_h - 1) * dilation[0] + 1
            span_w = (tile_w - 1) * stride[1] + (kernel_w - 1) * dilation[1] + 1
            for chunk in chunks:
                if taps * tile_h * tile_w + chunk * span_h * span_w > budget:
                    continue
                cost = taps / chunk + span_h * span_w / (tile_h * tile_w)
                if best_cost is None or cost < best_cost - 1e-12:
                    best, best_cost = (tile_h, tile_w, chunk), cost
                break  # smaller chunks of this tile only cost more
    return best


ALGORITHMS = ("auto", "direct")


def _launch_forward(call: Call, geom: Geometry, x, kernel, y, algorithm: str = "auto") -> None:
    """'auto': the halo-tiled kernel where its smallest tile fits the shared-memory budget,
    else the direct one; 'direct': one thread per output reading device memory (the
    official CuPy kernel's design, kept as a fallback and a benchmark baseline)."""
    plan = forward_plan(call, geom) if algorithm != "direct" else None
    if plan is None:
        pixels = geom.out_h * geom.out_w
        block = threads_for(pixels, _MAX_THREADS)
        call.launch(KERNELS, "involution2d_direct_fwd", geom.batch * geom.channels * -(-pixels // block), block,
                    geom.params(), x, kernel, y)
        return
    tile_h, tile_w, chunk = plan
    cg = geom.channels // geom.groups
    items = (geom.batch * geom.groups * -(-geom.out_h // tile_h) * -(-geom.out_w // tile_w) * -(-cg // chunk))
    work = -(-chunk // _CHANNELS_PER_THREAD) * tile_h * tile_w
    call.launch(KERNELS, "involution2d_fwd", items, threads_for(work, _MAX_THREADS),
                geom.params(tile_h, tile_w, chunk), x, kernel, y,
                shared_bytes=shared_entries(geom, tile_h, tile_w, chunk) * call.accumulator_bytes)


# --- the op ---

def involution2d(input, kernel, stride=1, padding=0, dilation=1, *, algorithm="auto"):
    """y[b, c, oy, ox] = sum_{i, j} kernel[b, c // (C // G), i, j, oy, ox] *
    x[b, c, oy*sh - ph + i*dh, ox*sw - pw + j*dw] (zero padding).

    input [B, C, H, W], kernel [B, G, kh, kw, Ho, Wo] (C % G == 0; Ho, Wo as conv2d's
    output size) -> [B, C, Ho, Wo]. stride, padding, dilation: an int or a pair.
    algorithm: 'auto' (tiled where it fits) or 'direct' (one thread per output)."""
    op = "involution2d"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{op}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    call = Call(op, input=input, kernel=kernel)
    geom = Geometry(op, call, stride, padding, dilation)
    y = call.empty(geom.output_shape)
    if geom.batch:
        _launch_forward(call, geom, call.operand("input"), call.operand("kernel"), y, algorithm)
    return call.export(y)


def involution2d_backward(grad_output, input, kernel, stride=1, padding=0, dilation=1, wrt=None, *,
                          algorithm="auto"):
    """Gradients of involution2d: (grad_input, grad_kernel); None for an argument not in
    `wrt` (a name or tuple of names among input, kernel). `algorithm` is the forward's
    (accepted as every backward takes its forward's arguments; the gradients' kernels are
    the same for both)."""
    op = "involution2d_backward"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{op}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    call = Call(op, input=input, grad_output=grad_output, kernel=kernel)
    geom = Geometry(op, call, stride, padding, dilation)
    check_grad_output(op, call, geom.output_shape)
    wanted = parse_wrt(op, wrt, NAMES)
    grad_input = grad_kernel = None
    gy = call.operand("grad_output") if wanted and geom.batch else None
    cg = geom.channels // geom.groups
    if "input" in wanted:
        grad_input = call.empty(geom.input_shape)
        pixels = geom.in_h * geom.in_w
        block = threads_for(pixels, _MAX_THREADS)
        items = geom.batch * geom.groups * -(-cg // _CHANNELS_PER_THREAD) * -(-pixels // block)
        if items:
            call.launch(KERNELS, "involution2d_bwd_input", items, block, geom.params(), gy,
                        call.operand("kernel"), grad_input)
    if "kernel" in wanted:
        grad_kernel = call.empty(geom.kernel_shape)
        pixels = geom.out_h * geom.out_w
        block = threads_for(pixels, _MAX_THREADS)
        taps = geom.kernel_h * geom.kernel_w
        items = geom.batch * geom.groups * -(-taps // _TAPS_PER_THREAD) * -(-pixels // block)
        if items:
            call.launch(KERNELS, "involution2d_bwd_kernel", items, block, geom.params(), gy, call.operand("input"),
                        grad_kernel)
    return call.export(grad_input), call.export(grad_kernel)


def _output_shape(op, s, stride, padding, dilation, algorithm):
    return Geometry(op, s, stride, padding, dilation).output_shape


register_op(OpDef(involution2d, involution2d_backward, arrays=NAMES, output_shape=_output_shape,
                  examples=(Example(dict(input=(2, 6, 7, 6), kernel=(2, 2, 3, 3, 4, 3)), dict(stride=2, padding=1)),)))
