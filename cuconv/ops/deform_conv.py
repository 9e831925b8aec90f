"""deform_conv2d: deformable convolution (DCNv1 without mask, DCNv2 with), with
torchvision.ops.deform_conv2d semantics, forward and hand-written backward.

Kernels: kernels_cu/deform_conv.cu (formulas, the boundary rule and thread mapping are
documented there). The forward is ONE fused kernel: bilinear sampling, modulation and
the weight contraction, with a bounded stage of samples in shared memory and no im2col
tensor; it allocates only the output. The backward computes the column gradient
gcol = W^T gy on the fly wherever it is needed (never stored) and is bitwise
reproducible by default: the input gradient is a gather over sample points binned by a
stable counting sort, in chunks of (batch, offset group) segments whose workspace is
bounded by `_BIN_WORKSPACE_ENTRIES` int64 entries. `deterministic=False` scatters with
atomics instead (faster, not reproducible bit for bit).
"""

from __future__ import annotations

from .. import _arrays
from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import Call, check_grad_output, checked_output_size, describe_shapes, int_pair, parse_wrt, threads_for

KERNELS = KernelModule(
    "deform_conv.cu",
    kernels=("deform_conv2d_fwd", "deform_conv2d_bwd_weight", "deform_conv2d_bwd_bias", "deform_conv2d_bwd_offset",
             "deform_conv2d_bwd_input_bin", "deform_conv2d_bwd_input", "deform_conv2d_bwd_input_atomic",
             "deform_conv2d_fill_zero", "deform_conv2d_cast"),
    params_struct="DeformParams",
)
NAMES = ("input", "offset", "weight", "bias", "mask")
_OUT_PER_THREAD = KERNELS.constant("DEFORM_OUT_PER_THREAD")
_BIN_THREADS = KERNELS.constant("DEFORM_BIN_THREADS")
_ATOMIC_THREADS = KERNELS.constant("DEFORM_ATOMIC_THREADS")
# Forward: output pixels per block item, threads per block, and the shared memory one
# block stages samples in (the device's own per-block limit is read; the smaller is used).
_MAX_TILE = 64
_MAX_THREADS = 256
_SHARED_BUDGET_BYTES = 48 * 1024
# Deterministic input gradient: int64 entries of the binning workspace per chunk of
# (batch, offset group) segments; a segment needs (H+1)(W+1) + 2 + kh*kw*Ho*Wo of them
# (at least one segment runs per chunk). 2**22 entries = 32 MiB.
_BIN_WORKSPACE_ENTRIES = 2**22


class DeformGeometry:
    """The checked shapes of one deform_conv2d call."""

    def __init__(self, op: str, call: Call, stride, padding, dilation):
        shapes = describe_shapes(call, NAMES)
        for name, layout in (("input", "[batch, in_channels, height, width]"),
                             ("offset", "[batch, 2 * offset_groups * kh * kw, out_h, out_w]"),
                             ("weight", "[out_channels, in_channels / weight_groups, kh, kw]"),
                             ("mask", "[batch, offset_groups * kh * kw, out_h, out_w]")):
            if call.shape(name) is not None and len(call.shape(name)) != 4:
                raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {call.shape(name)} ({shapes})")
        self.stride = int_pair(op, "stride", stride, 1)
        self.pad = int_pair(op, "padding", padding, 0)
        self.dilation = int_pair(op, "dilation", dilation, 1)
        batch, cin, h, w = call.shape("input")
        cout, cin_g, kh, kw = call.shape("weight")
        if min(cout, cin_g, kh, kw) < 1:
            raise ValueError(f"{op}: weight has an empty dimension ({shapes})")
        if cin < 1 or cin % cin_g:
            raise ValueError(f"{op}: input has {cin} channels, not a positive multiple of weight's "
                             f"in_channels/weight_groups={cin_g} ({shapes})")
        groups = cin // cin_g
        if cout % groups:
            raise ValueError(f"{op}: weight's out_channels={cout} is not divisible by weight_groups={groups} "
                             f"(= in_channels {cin} / weight.shape[1] {cin_g}) ({shapes})")
        if call.shape("bias") is not None and call.shape("bias") != (cout,):
            raise ValueError(f"{op}: bias must have shape ({cout},) to match weight, got {call.shape('bias')} "
                             f"({shapes})")
        out_h, out_w = checked_output_size(op, (h, w), (kh, kw), self.stride, self.pad, self.dilation, shapes)
        taps = kh * kw
        ob, oc, oh, ow = call.shape("offset")
        if ob != batch or oc < 2 * taps or oc % (2 * taps) or (oh, ow) != (out_h, out_w):
            raise ValueError(f"{op}: offset must have shape [{batch}, 2 * offset_groups * {taps}, {out_h}, {out_w}] "
                             f"(batch, 2 * offset_groups * kh * kw, out_h, out_w), got {call.shape('offset')} "
                             f"({shapes})")
        offset_groups = oc // (2 * taps)
        if cin % offset_groups:
            raise ValueError(f"{op}: input's {cin} channels are not divisible by offset_groups={offset_groups} "
                             f"(= offset.shape[1] {oc} / (2 * {taps})) ({shapes})")
        if call.shape("mask") is not None and call.shape("mask") != (batch, offset_groups * taps, out_h, out_w):
            raise ValueError(f"{op}: mask must have shape {(batch, offset_groups * taps, out_h, out_w)} "
                             f"(batch, offset_groups * kh * kw, out_h, out_w) to match offset, got "
                             f"{call.shape('mask')} ({shapes})")
        self.batch, self.in_channels, self.in_h, self.in_w = batch, cin, h, w
        self.out_channels, self.out_h, self.out_w = cout, out_h, out_w
        self.kernel_h, self.kernel_w = kh, kw
        self.weight_groups, self.offset_groups = groups, offset_groups

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    def params(self, tile=0, channel_chunk=0, tap_chunk=0, segment_begin=0, segment_count=0) -> dict:
        return dict(batch=self.batch, in_channels=self.in_channels, in_h=self.in_h, in_w=self.in_w,
                    out_channels=self.out_channels, out_h=self.out_h, out_w=self.out_w,
                    kernel_h=self.kernel_h, kernel_w=self.kernel_w, stride_h=self.stride[0], stride_w=self.stride[1],
                    pad_h=self.pad[0], pad_w=self.pad[1], dilation_h=self.dilation[0], dilation_w=self.dilation[1],
                    weight_groups=self.weight_groups, offset_groups=self.offset_groups, tile=tile,
                    channel_chunk=channel_chunk, tap_chunk=tap_chunk, segment_begin=segment_begin,
                    segment_count=segment_count)


def forward_plan(call: Call, geom: DeformGeometry) -> dict:
    """The forward's launch: tile (pixels per block item), threads, the shared-memory stage
    (channel_chunk channels x tap_chunk taps x tile pixels of accumulators) and items."""
    pixels, taps = geom.pixels, geom.taps
    cin_g, cout_g = geom.in_channels // geom.weight_groups, geom.out_channels // geom.weight_groups
    tile = min(pixels, _MAX_TILE)
    slots = min(-(-cout_g // _OUT_PER_THREAD), max(1, _MAX_THREADS // tile))
    budget = min(_SHARED_BUDGET_BYTES, call.max_shared_bytes())
    acc = call.accumulator_bytes
    tap_chunk = max(1, min(taps, budget // (tile * acc)))
    channel_chunk = max(1, min(cin_g, budget // (tap_chunk * tile * acc)))
    items = geom.batch * geom.weight_groups * -(-pixels // tile) * -(-cout_g // (slots * _OUT_PER_THREAD))
    return dict(tile=tile, block=slots * tile, channel_chunk=channel_chunk, tap_chunk=tap_chunk, items=items,
                shared_bytes=channel_chunk * tap_chunk * tile * acc)


def bin_chunk_segments(geom: DeformGeometry) -> int:
    """(batch, offset group) segments per chunk of the deterministic input gradient."""
    per_segment = (geom.in_h + 1) * (geom.in_w + 1) + 2 + geom.taps * geom.pixels
    return max(1, min(geom.batch * geom.offset_groups, _BIN_WORKSPACE_ENTRIES // per_segment))


def _check(op: str, call: Call, stride, padding, dilation) -> DeformGeometry:
    return DeformGeometry(op, call, stride, padding, dilation)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """y = deform_conv2d(input [B, Cin, H, W], offset [B, 2*Go*kh*kw, Ho, Wo],
    weight [Cout, Cin/Gw, kh, kw], bias [Cout], mask [B, Go*kh*kw, Ho, Wo]) -> [B, Cout, Ho, Wo],
    as torchvision.ops.deform_conv2d (DCNv1 with mask=None, DCNv2 with a mask)."""
    op = "deform_conv2d"
    call = Call(op, input=input, offset=offset, weight=weight, bias=bias, mask=mask, optional=("bias", "mask"))
    geom = _check(op, call, stride, padding, dilation)
    y = call.empty(geom.output_shape)
    plan = forward_plan(call, geom)
    call.launch(KERNELS, "deform_conv2d_fwd", plan["items"], plan["block"],
                geom.params(plan["tile"], plan["channel_chunk"], plan["tap_chunk"]),
                call.operand("input"), call.operand("offset"), call.operand("mask"), call.operand("weight"),
                call.operand("bias"), y, shared_bytes=plan["shared_bytes"])
    return call.export(y)


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                           wrt=None, *, deterministic=True):
    """Gradients of deform_conv2d: (grad_input, grad_offset, grad_weight, grad_bias, grad_mask);
    None for an argument not in `wrt` (a name or tuple of names among input, offset, weight,
    bias, mask) or that was None. deterministic=False computes grad_input with atomics
    (faster; its bits may vary run to run)."""
    op = "deform_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, offset=offset, weight=weight, bias=bias, mask=mask,
                optional=("bias", "mask"))
    geom = _check(op, call, stride, padding, dilation)
    check_grad_output(op, call, geom.output_shape)
    wanted = set(parse_wrt(op, wrt, NAMES))
    wanted -= {n for n in ("bias", "mask") if call.shape(n) is None}
    if not isinstance(deterministic, bool):
        raise TypeError(f"{op}: deterministic must be a bool, got {deterministic!r}")
    gy, x, off, w, m = (call.operand(n) for n in ("grad_output", "input", "offset", "weight", "mask"))
    params = geom.params()
    grads = dict.fromkeys(NAMES)
    reduction_block = threads_for(geom.batch * geom.pixels)
    if "bias" in wanted:
        grads["bias"] = call.empty((geom.out_channels,))
        call.launch(KERNELS, "deform_conv2d_bwd_bias", geom.out_channels, reduction_block, params, gy, grads["bias"])
    if "weight" in wanted:
        grads["weight"] = call.empty(call.shape("weight"))
        cin_g, cout_g = geom.in_channels // geom.weight_groups, geom.out_channels // geom.weight_groups
        items = geom.weight_groups * -(-cout_g // _OUT_PER_THREAD) * cin_g * geom.taps
        call.launch(KERNELS, "deform_conv2d_bwd_weight", items, reduction_block, params, gy, x, off, m,
                    grads["weight"])
    if wanted & {"offset", "mask"}:
        grads["offset"] = call.empty(call.shape("offset"))  # a workspace when only the mask's is wanted
        if "mask" in wanted:
            grads["mask"] = call.empty(call.shape("mask"))
        points = geom.batch * geom.offset_groups * geom.taps * geom.pixels
        block = threads_for(points)
        call.launch(KERNELS, "deform_conv2d_bwd_offset", -(-points // block), block, params, gy, x, off, m, w,
                    grads["offset"], grads["mask"])
        if "offset" not in wanted:
            grads["offset"] = None
    if "input" in wanted:
        grads["input"] = call.empty(call.shape("input"))
        if deterministic:
            _grad_input_deterministic(call, geom, gy, off, m, w, grads["input"])
        else:
            _grad_input_atomic(call, geom, gy, off, m, w, grads["input"])
    return tuple(call.export(grads[n]) for n in NAMES)


def _grad_input_deterministic(call: Call, geom: DeformGeometry, gy, off, m, w, grad_x) -> None:
    """Per chunk of segments (b, g): bin the sample points by cell (stable counting sort),
    then gather every input gradient element of the chunk from its 4 cells."""
    segments = geom.batch * geom.offset_groups
    chunk = bin_chunk_segments(geom)
    bins = (geom.in_h + 1) * (geom.in_w + 1) + 1
    on_host = call.backend == "interpret"
    starts = _arrays.empty(call.anchor, (chunk, bins + 1), on_host, "float64")  # int64 bits
    order = _arrays.empty(call.anchor, (chunk, geom.taps * geom.pixels), on_host, "float64")  # int64 bits
    cpo = geom.in_channels // geom.offset_groups
    plane = geom.in_h * geom.in_w
    bin_block = threads_for(geom.taps * geom.pixels, _BIN_THREADS)
    gather_block = threads_for(cpo * plane)
    for begin in range(0, segments, chunk):
        count = min(chunk, segments - begin)
        params = geom.params(segment_begin=begin, segment_count=count)
        call.launch(KERNELS, "deform_conv2d_bwd_input_bin", count, bin_block, params, off, starts, order)
        call.launch(KERNELS, "deform_conv2d_bwd_input", -(-count * cpo * plane // gather_block), gather_block,
                    params, gy, off, m, w, starts, order, grad_x)


def _grad_input_atomic(call: Call, geom: DeformGeometry, gy, off, m, w, grad_x) -> None:
    """deterministic=False: atomics into an accumulator-typed buffer of the input's shape."""
    on_host = call.backend == "interpret"
    buffer = _arrays.empty(call.anchor, call.shape("input"), on_host,
                           "float64" if call.dtype == "float64" else "float32")
    params = geom.params()
    elements = geom.batch * geom.in_channels * geom.in_h * geom.in_w
    block = threads_for(elements)
    call.launch(KERNELS, "deform_conv2d_fill_zero", -(-elements // block), block, params, buffer)
    points = geom.batch * geom.in_channels * geom.taps * geom.pixels
    call.launch(KERNELS, "deform_conv2d_bwd_input_atomic", -(-points // _ATOMIC_THREADS), _ATOMIC_THREADS, params, gy, off, m, w, buffer)
    call.launch(KERNELS, "deform_conv2d_cast", -(-elements // block), block, params, buffer, grad_x)


def _output_shape(op, s, stride, padding, dilation):
    return DeformGeometry(op, s, stride, padding, dilation).output_shape


register_op(OpDef(deform_conv2d, deform_conv2d_backward, arrays=NAMES, output_shape=_output_shape,
                  nonlinear=("offset",),  # bilinear sampling: second derivatives through it are refused
                  examples=(Example(dict(input=(2, 4, 6, 5), offset=(2, 36, 6, 5), weight=(6, 2, 3, 3), bias=(6,),
                                         mask=(2, 18, 6, 5)), dict(padding=1)),
                            Example(dict(input=(1, 3, 6, 6), offset=(1, 8, 5, 2), weight=(2, 3, 2, 2), bias=None,
                                         mask=None), dict(stride=(1, 2), dilation=(1, 2))))))
