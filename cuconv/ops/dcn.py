"""dcnv3 / dcnv4: the core operators of DCNv3 (InternImage) and DCNv4 (FlashInternImage),
with the official CUDA kernels' semantics, forward and hand-written backward.

    dcnv3(input [N, H, W, C], offset [N, Ho, Wo, G*K*2], mask [N, Ho, Wo, G*K], kernel_size, ...)
    dcnv4(input [N, H, W, C], offset_mask [N, Ho, Wo, P], kernel_size, ...)   -> [N, Ho, Wo, C]

Channels-last, C = G*D (G = groups). A deformable aggregation: each group samples its own
D channels bilinearly at K learned points and sums them weighted by the mask (used as
given: no softmax inside the op). Tap k = i*kh + j with the x index i outside;
remove_center drops the centre tap (odd kernels only). DCNv4 packs, per group g, the 2K
interleaved (dx, dy) and then the K mask values in channels [g*3K, (g+1)*3K); channels
from 3GK up to P (a multiple of 8) are ignored and get a zero gradient. The formulas,
the boundary rule and the thread mapping are in kernels_cu/dcn.cu; one kernel family
serves both ops (only the offset/mask addressing differs). The backward is deterministic:
offset/mask gradients are per-point fixed-order reductions over D channels, the input
gradient is a gather over sample points binned by a stable counting sort, in chunks of
(batch, group) segments bounded by `_BIN_WORKSPACE_ENTRIES` int64 entries.
"""

from __future__ import annotations

import struct
from numbers import Real

from .. import _arrays
from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import (Call, check_grad_output, checked_output_size, describe_shapes, int_pair, parse_wrt, positive_int,
                      threads_for)

KERNELS = KernelModule(
    "dcn.cu",
    kernels=("dcn_fwd", "dcn_bwd_offset", "dcn_bwd_input_bin", "dcn_bwd_input"),
    params_struct="DcnParams",
)
_BIN_THREADS = KERNELS.constant("DCN_BIN_THREADS")
# Forward: threads per block and the shared memory of one block's (py, px, m) stage.
_MAX_THREADS = 256
_SHARED_BUDGET_BYTES = 48 * 1024
# Input gradient: int64 entries of the binning workspace per chunk of (batch, group)
# segments; a segment needs (H+1)(W+1) + 2 + Ho*Wo*K (at least one segment per chunk).
# 2**22 entries = 32 MiB.
_BIN_WORKSPACE_ENTRIES = 2**22


class DcnGeometry:
    """The checked shapes and parameters of one dcnv3 / dcnv4 call (version 3 or 4)."""

    def __init__(self, op, call, version, kernel_size, stride, padding, dilation, groups, offset_scale,
                 remove_center):
        names = ("input", "offset", "mask") if version == 3 else ("input", "offset_mask")
        shapes = describe_shapes(call, names)
        self.kernel = int_pair(op, "kernel_size", kernel_size, 1)
        self.stride = int_pair(op, "stride", stride, 1)
        self.pad = int_pair(op, "padding", padding, 0)
        self.dilation = int_pair(op, "dilation", dilation, 1)
        self.groups = positive_int(op, "groups", groups)
        if not isinstance(offset_scale, Real) or isinstance(offset_scale, bool):
            raise TypeError(f"{op}: offset_scale must be a real number, got {offset_scale!r}")
        self.offset_scale = float(offset_scale)
        if not isinstance(remove_center, bool):
            raise TypeError(f"{op}: remove_center must be a bool, got {remove_center!r}")
        self.remove_center = remove_center
        kh, kw = self.kernel
        if remove_center and (kh % 2 == 0 or kw % 2 == 0):
            raise ValueError(f"{op}: remove_center needs an odd kernel_size (a centre tap), got {self.kernel}")
        if remove_center and kh * kw == 1:
            raise ValueError(f"{op}: remove_center with kernel_size (1, 1) leaves no tap")
        taps = kh * kw - (1 if remove_center else 0)
        for name in names:
            if len(call.shape(name)) != 4:
                raise ValueError(f"{op}: {name} must be 4-D channels-last {_LAYOUTS[name]}, got shape "
                                 f"{call.shape(name)} ({shapes})")
        batch, h, w, c = call.shape("input")
        g = self.groups
        if c < 1 or c % g:
            raise ValueError(f"{op}: input's channels (last dim, {c}) must be a positive multiple of groups={g} "
                             f"(input is channels-last [N, H, W, C]; {shapes})")
        out_h, out_w = checked_output_size(op, (h, w), self.kernel, self.stride, self.pad, self.dilation, shapes)
        expected = {"offset": g * taps * 2, "mask": g * taps}
        for name in names[1:]:
            shape = call.shape(name)
            if shape[0] != batch:
                raise ValueError(f"{op}: {name}'s batch {shape[0]} differs from input's {batch} ({shapes})")
            if shape[1:3] != (out_h, out_w):
                raise ValueError(f"{op}: {name}'s spatial size {shape[1:3]} must be the output's ({out_h}, {out_w}) "
                                 f"({shapes}, kernel_size {self.kernel}, stride {self.stride}, padding {self.pad}, "
                                 f"dilation {self.dilation})")
            if name in expected and shape[3] != expected[name]:
                what = "groups * K * 2" if name == "offset" else "groups * K"
                raise ValueError(f"{op}: {name} must have {expected[name]} channels ({what}, groups={g}, K={taps} "
                                 f"taps) in its last dim, got shape {shape} ({shapes})")
            if name == "offset_mask" and (shape[3] % 8 or shape[3] < 3 * g * taps):
                raise ValueError(f"{op}: offset_mask's channels (last dim, {shape[3]}) must be a multiple of 8 and "
                                 f">= 3 * groups * K = {3 * g * taps} (groups={g}, K={taps} taps), e.g. "
                                 f"{-(-3 * g * taps // 8) * 8} ({shapes})")
        self.version = version
        self.batch, self.in_h, self.in_w, self.channels = batch, h, w, c
        self.out_h, self.out_w, self.taps = out_h, out_w, taps
        self.group_channels = c // g
        self.om_channels = call.shape("offset_mask")[3] if version == 4 else None

    @property
    def output_shape(self):
        return (self.batch, self.out_h, self.out_w, self.channels)

    def layout(self) -> dict:
        g, k = self.groups, self.taps
        if self.version == 3:
            return dict(off_pixel_stride=2 * g * k, off_group_stride=2 * k, mask_pixel_stride=g * k,
                        mask_group_stride=k, mask_base=0, pad_channels_begin=2 * g * k)
        return dict(off_pixel_stride=self.om_channels, off_group_stride=3 * k, mask_pixel_stride=self.om_channels,
                    mask_group_stride=3 * k, mask_base=2 * k, pad_channels_begin=3 * g * k)

    def params(self, **extra) -> dict:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        base = dict(batch=self.batch, in_channels=self.channels, in_h=self.in_h, in_w=self.in_w,
                    out_channels=self.channels, out_h=self.out_h, out_w=self.out_w, kernel_h=kh, kernel_w=kw,
                    stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw, dilation_h=dh, dilation_w=dw,
                    groups=self.groups, group_channels=self.group_channels, taps=self.taps,
                    remove_center=int(self.remove_center),
                    offset_scale_bits=struct.unpack("<q", struct.pack("<d", self.offset_scale))[0],
                    channel_span=0, pixels_per_item=0, tap_chunk=0, reduce_width=1, segment_begin=0,
                    segment_count=0)
        return {**base, **self.layout(), **extra}


_LAYOUTS = {"input": "[N, H, W, C]", "offset": "[N, Ho, Wo, groups * K * 2]", "mask": "[N, Ho, Wo, groups * K]",
            "offset_mask": "[N, Ho, Wo, P]"}


def _forward(call: Call, geom: DcnGeometry, off, msk):
    y = call.empty(geom.output_shape)
    pixels = geom.batch * geom.out_h * geom.out_w
    if pixels == 0:
        return y
    span = min(geom.channels, _MAX_THREADS)
    ppi = max(1, min(_MAX_THREADS // span, pixels))
    block = threads_for(span * ppi)
    gspan = (span - 1) // geom.group_channels + 2
    budget = min(_SHARED_BUDGET_BYTES, call.max_shared_bytes())
    per_tap = ppi * gspan * 3 * call.accumulator_bytes
    tap_chunk = max(1, min(geom.taps, budget // per_tap))
    items = -(-pixels // ppi) * -(-geom.channels // span)
    call.launch(KERNELS, "dcn_fwd", items, block,
                geom.params(channel_span=span, pixels_per_item=ppi, tap_chunk=tap_chunk),
                call.operand("input"), off, msk, y, shared_bytes=per_tap * tap_chunk)
    return y


def _backward(call: Call, geom: DcnGeometry, off, msk, grad_offset, grad_mask, grad_x):
    """Fills the requested gradients (None: not wanted)."""
    gy, x = call.operand("grad_output"), call.operand("input")
    if grad_offset is not None or grad_mask is not None:
        points = geom.batch * geom.out_h * geom.out_w * geom.groups * geom.taps
        width = min(32, 1 << (geom.group_channels - 1).bit_length())  # lanes per point
        block = threads_for(points * width)
        call.launch(KERNELS, "dcn_bwd_offset", -(-points // (block // width)), block,
                    geom.params(reduce_width=width), gy, x, off, msk, grad_offset, grad_mask)
    if grad_x is not None:
        _grad_input(call, geom, gy, off, msk, grad_x)


def bin_chunk_segments(geom: DcnGeometry) -> int:
    """(batch, group) segments per chunk of the input gradient's binning workspace."""
    per_segment = (geom.in_h + 1) * (geom.in_w + 1) + 2 + geom.taps * geom.out_h * geom.out_w
    return max(1, min(geom.batch * geom.groups, _BIN_WORKSPACE_ENTRIES // per_segment))


def _grad_input(call: Call, geom: DcnGeometry, gy, off, msk, grad_x) -> None:
    segments = geom.batch * geom.groups
    if segments == 0:
        return
    chunk = bin_chunk_segments(geom)
    bins = (geom.in_h + 1) * (geom.in_w + 1) + 1
    points = geom.taps * geom.out_h * geom.out_w
    on_host = call.backend == "interpret"
    starts = _arrays.empty(call.anchor, (chunk, bins + 1), on_host, "float64")  # int64 bits
    order = _arrays.empty(call.anchor, (chunk, points), on_host, "float64")  # int64 bits
    per_segment = geom.in_h * geom.in_w * geom.group_channels
    bin_block = threads_for(points, _BIN_THREADS)
    gather_block = threads_for(per_segment)
    for begin in range(0, segments, chunk):
        count = min(chunk, segments - begin)
        params = geom.params(segment_begin=begin, segment_count=count)
        call.launch(KERNELS, "dcn_bwd_input_bin", count, bin_block, params, off, msk, starts, order)
        call.launch(KERNELS, "dcn_bwd_input", -(-count * per_segment // gather_block), gather_block, params, gy,
                    off, msk, starts, order, grad_x)


def dcnv3(input, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
          remove_center=False):
    """DCNv3's core op: input [N, H, W, C] (channels-last, C = groups*D), offset
    [N, Ho, Wo, groups*K*2] (channel (g*K + k)*2 is dx, +1 dy), mask [N, Ho, Wo, groups*K]
    -> [N, Ho, Wo, C]: out[..., g*D + c] = sum_k mask[g, k] * bilinear sample of channel
    g*D + c at tap k's deformed point (InternImage's dcnv3 CUDA semantics)."""
    op = "dcnv3"
    call = Call(op, input=input, offset=offset, mask=mask)
    geom = DcnGeometry(op, call, 3, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center)
    return call.export(_forward(call, geom, call.operand("offset"), call.operand("mask")))


def dcnv3_backward(grad_output, input, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                   offset_scale=1.0, remove_center=False, wrt=None):
    """Gradients of dcnv3: (grad_input, grad_offset, grad_mask); None for an argument not in
    `wrt` (a name or tuple of names among input, offset, mask). Deterministic."""
    op = "dcnv3_backward"
    call = Call(op, input=input, grad_output=grad_output, offset=offset, mask=mask)
    geom = DcnGeometry(op, call, 3, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center)
    check_grad_output(op, call, geom.output_shape)
    wanted = parse_wrt(op, wrt, ("input", "offset", "mask"))
    grads = {n: call.empty(call.shape(n)) if n in wanted else None for n in ("input", "offset", "mask")}
    _backward(call, geom, call.operand("offset"), call.operand("mask"), grads["offset"], grads["mask"],
              grads["input"])
    return tuple(call.export(grads[n]) for n in ("input", "offset", "mask"))


def dcnv4(input, offset_mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
          remove_center=False):
    """DCNv4's core op: input [N, H, W, C] (channels-last, C = groups*D), offset_mask
    [N, Ho, Wo, P] with P a multiple of 8 and >= 3*groups*K: group g's channels
    [g*3K, g*3K + 2K) are interleaved (dx, dy) per tap and [g*3K + 2K, (g+1)*3K) its mask;
    channels from 3*groups*K up are ignored. Computes what dcnv3 computes on the unpacked
    offset and mask (FlashInternImage's dcnv4 CUDA semantics, any kernel size and D)."""
    op = "dcnv4"
    call = Call(op, input=input, offset_mask=offset_mask)
    geom = DcnGeometry(op, call, 4, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center)
    om = call.operand("offset_mask")
    return call.export(_forward(call, geom, om, om))


def dcnv4_backward(grad_output, input, offset_mask, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                   offset_scale=1.0, remove_center=False, wrt=None):
    """Gradients of dcnv4: (grad_input, grad_offset_mask); the padding channels of
    grad_offset_mask (from 3*groups*K up) are exactly zero. Deterministic."""
    op = "dcnv4_backward"
    call = Call(op, input=input, grad_output=grad_output, offset_mask=offset_mask)
    geom = DcnGeometry(op, call, 4, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center)
    check_grad_output(op, call, geom.output_shape)
    wanted = parse_wrt(op, wrt, ("input", "offset_mask"))
    grad_x = call.empty(call.shape("input")) if "input" in wanted else None
    grad_om = call.empty(call.shape("offset_mask")) if "offset_mask" in wanted else None
    om = call.operand("offset_mask")
    _backward(call, geom, om, om, grad_om, grad_om, grad_x)
    return call.export(grad_x), call.export(grad_om)


def _output_shape3(op, s, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    return DcnGeometry(op, s, 3, kernel_size, stride, padding, dilation, groups, offset_scale,
                       remove_center).output_shape


def _output_shape4(op, s, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    return DcnGeometry(op, s, 4, kernel_size, stride, padding, dilation, groups, offset_scale,
                       remove_center).output_shape


# Bilinear sampling: not affine in the offsets, so higher orders through them are refused.
register_op(OpDef(dcnv3, dcnv3_backward, arrays=("input", "offset", "mask"), output_shape=_output_shape3,
                  nonlinear=("offset",),
                  examples=(Example(dict(input=(2, 5, 4, 6), offset=(2, 5, 4, 36), mask=(2, 5, 4, 18)),
                                    dict(kernel_size=3, padding=1, groups=2)),
                            Example(dict(input=(1, 6, 5, 3), offset=(1, 3, 5, 12), mask=(1, 3, 5, 6)),
                                    dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 1), offset_scale=0.5)))))
register_op(OpDef(dcnv4, dcnv4_backward, arrays=("input", "offset_mask"), output_shape=_output_shape4,
                  nonlinear=("offset_mask",),
                  examples=(Example(dict(input=(2, 5, 4, 4), offset_mask=(2, 5, 4, 56)),
                                    dict(kernel_size=3, padding=1, groups=2)),
                            Example(dict(input=(1, 5, 5, 3), offset_mask=(1, 5, 5, 24)),
                                    dict(kernel_size=3, padding=1, remove_center=True)))))
