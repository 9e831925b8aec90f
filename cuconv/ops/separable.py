"""Separable convolutions: depthwise-separable (depthwise k x k, then pointwise 1x1) and
spatial-separable (kh x 1, then 1 x kw), forward fused and hand-composed backward.

Forward: ONE kernel per op (kernels_cu/separable.cu, formulas and thread mapping
documented there) in which the intermediate of the two convolutions lives in shared
memory, in the accumulator type, and is never written to device memory; the output
is the only array allocated. A block keeps a tile of the intermediate on chip: the
tile is sized on the host so it fits `_SHARED_BUDGET_BYTES` (and the device's own
per-block limit). When even the smallest tile cannot fit (a depthwise-separable layer
with more than 12288 intermediate channels in fp32, 6144 in fp64; a spatial-separable
group with Cmid/groups * ((kw-1)*dilation_w + 1) accumulators beyond the budget), the
op falls back to the unfused composition: two cuconv conv2d calls, which allocate the
intermediate.

Backward: composed from cuconv's conv2d forward/backward. The intermediate is
recomputed (one conv2d forward) because the second-stage weight gradient needs it
(and conv2d_backward takes it for shapes); then conv2d_backward of the second stage
gives the intermediate's gradient and the second-stage weight/bias gradients, and
conv2d_backward of the first stage the rest. It allocates the intermediate and, when
any first-stage gradient is wanted, its gradient, besides the returned gradients.
"""

from __future__ import annotations

from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import (Call, check_grad_output, check_grouped_channels, check_rank, describe_shapes, int_pair, parse_wrt,
                      positive_int, threads_for)
from .conv2d import conv2d, conv2d_backward, conv_geometry

KERNELS = KernelModule(
    "separable.cu",
    kernels=("depthwise_separable_conv2d_fwd", "spatial_separable_conv2d_fwd"),
    params_struct="SeparableParams",
)
# Shared memory one block keeps its tile of the intermediate in: the per-block limit
# every NVIDIA GPU grants without an opt-in (the device's own limit is read and the
# smaller one used). Tests shrink it to force the unfused fallback.
_SHARED_BUDGET_BYTES = 48 * 1024
# Largest tile: output pixels (depthwise-separable) or output columns (spatial) one
# block item covers; more buys no reuse, only fewer and fatter blocks.
_MAX_TILE = 128
_OUT_PER_THREAD = KERNELS.constant("SEPARABLE_OUT_PER_THREAD")  # output channels per phase-2 item
_MAX_THREADS = 256

DW_NAMES = ("input", "depthwise_weight", "pointwise_weight", "depthwise_bias", "pointwise_bias")
SPATIAL_NAMES = ("input", "weight_v", "weight_h", "bias")


# --- validation ---

def _check_4d(op: str, call: Call, name: str, layout: str) -> tuple[int, int, int, int]:
    return check_rank(op, name, call.shape(name), 4, layout)


def _depthwise_geometry(op: str, call: Call, stride, padding, dilation):
    """(geometry of the depthwise stage, out_channels); ValueError/TypeError naming the argument."""
    _, channels, _, _ = _check_4d(op, call, "input", "[batch, channels, height, width]")
    mid, one, kh, kw = _check_4d(op, call, "depthwise_weight", "[channels * multiplier, 1, kh, kw]")
    cout, cmid, ph, pw = _check_4d(op, call, "pointwise_weight", "[out_channels, channels * multiplier, 1, 1]")
    shapes = describe_shapes(call, DW_NAMES)
    if channels < 1:
        raise ValueError(f"{op}: input has no channels ({shapes})")
    if one != 1 or mid < 1 or mid % channels or min(kh, kw) < 1:
        raise ValueError(f"{op}: depthwise_weight must have shape [channels * multiplier, 1, kh, kw] with "
                         f"channels={channels} (the input's) and multiplier >= 1, got {call.shape('depthwise_weight')} "
                         f"({shapes})")
    if (ph, pw) != (1, 1):
        raise ValueError(f"{op}: pointwise_weight must be a 1x1 kernel [out_channels, {mid}, 1, 1], "
                         f"got {call.shape('pointwise_weight')} ({shapes})")
    if cmid != mid:
        raise ValueError(f"{op}: pointwise_weight has {cmid} input channels but depthwise_weight produces {mid} "
                         f"({shapes})")
    if cout < 1:
        raise ValueError(f"{op}: pointwise_weight has no output channels ({shapes})")
    for name, n in (("depthwise_bias", mid), ("pointwise_bias", cout)):
        if call.shape(name) is not None and call.shape(name) != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {call.shape(name)} ({shapes})")
    geom = conv_geometry(op, call.shape("input"), call.shape("depthwise_weight"), None, stride, padding, dilation,
                         groups=channels)
    return geom, cout


def spatial_stage_params(op: str, stride, padding, dilation) -> tuple[dict, dict]:
    """conv2d keyword parameters of the two stages of a spatial-separable conv: the
    vertical (kh x 1) stage takes the row stride/padding/dilation, the horizontal
    (1 x kw) stage the column ones. 'valid' is 'valid' for both; 'same' (stride 1 only)
    is 'same' for both, i.e. each stage pads its own axis as torch's 'same' does."""
    sh, sw = int_pair(op, "stride", stride, 1)
    dh, dw = int_pair(op, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and (sh, sw) != (1, 1):
            raise ValueError(f"{op}: padding='same' requires stride 1 (as in torch), got stride {(sh, sw)}")
        pad_v = pad_h = padding
    else:
        ph, pw = int_pair(op, "padding", padding, 0)
        pad_v, pad_h = (ph, 0), (0, pw)
    return (dict(stride=(sh, 1), padding=pad_v, dilation=(dh, 1)),
            dict(stride=(1, sw), padding=pad_h, dilation=(1, dw)))


def _spatial_geometry(op: str, call: Call, stride, padding, dilation, groups):
    """Geometry of the whole op as one kh x kw conv (its output size and top/left padding
    are the composition's: each stage only touches its own axis) and Cmid."""
    _, cin, _, _ = _check_4d(op, call, "input", "[batch, in_channels, height, width]")
    cmid, cin_g, kh, one_v = _check_4d(op, call, "weight_v", "[mid_channels, in_channels/groups, kh, 1]")
    cout, cmid_g, one_h, kw = _check_4d(op, call, "weight_h", "[out_channels, mid_channels/groups, 1, kw]")
    spatial_stage_params(op, stride, padding, dilation)  # parameter errors first, by name
    groups = positive_int(op, "groups", groups)
    shapes = describe_shapes(call, SPATIAL_NAMES)
    if one_v != 1:
        raise ValueError(f"{op}: weight_v must be a vertical kernel [mid_channels, in_channels/groups, kh, 1], "
                         f"got {call.shape('weight_v')} ({shapes})")
    if one_h != 1:
        raise ValueError(f"{op}: weight_h must be a horizontal kernel [out_channels, mid_channels/groups, 1, kw], "
                         f"got {call.shape('weight_h')} ({shapes})")
    if min(cmid, cin_g, kh, cout, cmid_g, kw) < 1:
        raise ValueError(f"{op}: weight_v or weight_h has an empty dimension ({shapes})")
    check_grouped_channels(op, "weight_v", cin, cin_g, cmid, groups, "mid_channels", f"({shapes})")
    if cmid_g * groups != cmid:
        raise ValueError(f"{op}: weight_h expects mid_channels/groups={cmid_g}, but weight_v gives "
                         f"{cmid} / groups={groups} = {cmid // groups} ({shapes})")
    if cout % groups:
        raise ValueError(f"{op}: weight_h's out_channels={cout} is not divisible by groups={groups} ({shapes})")
    if call.shape("bias") is not None and call.shape("bias") != (cout,):
        raise ValueError(f"{op}: bias must have shape ({cout},) to match weight_h, got {call.shape('bias')} "
                         f"({shapes})")
    geom = conv_geometry(op, call.shape("input"), (cout, cin_g, kh, kw), None, stride, padding, dilation, groups)
    return geom, cmid


# --- launch planning ---

def _budget(call: Call) -> int:
    return min(_SHARED_BUDGET_BYTES, call.max_shared_bytes())


def _round_tile(tile: int, pixels: int) -> int:
    """The whole plane when it fits; else whole warps of pixels where the tile is at least
    a warp wide (aligned, coalesced stores)."""
    if tile >= pixels:
        return pixels
    return tile - tile % 32 if tile >= 32 else tile


def _item_limit(out_channels: int) -> int:
    """Most tile entries with ceil(out_channels/4) * tile phase-2 items below 2**31 (the
    kernels count a block item's work in 32 bits)."""
    return (2**31 - 1) // -(-out_channels // _OUT_PER_THREAD)


def depthwise_tile(call: Call, mid_channels: int, out_channels: int, pixels: int) -> int | None:
    """Output pixels per block item such that mid_channels * tile accumulators fit the
    budget; None when not even one pixel fits (the unfused fallback)."""
    fit = min(_budget(call) // (mid_channels * call.accumulator_bytes), _item_limit(out_channels))
    if fit < 1:
        return None
    return _round_tile(min(fit, _MAX_TILE), pixels)


def spatial_tile(call: Call, cmid_g: int, cout_g: int, out_w: int, kernel_w: int, stride_w: int,
                 dilation_w: int):
    """(output columns per block item, mid columns it reads) such that cmid_g * span
    accumulators fit the budget; None when a one-column tile does not fit."""
    halo = (kernel_w - 1) * dilation_w + 1
    columns = _budget(call) // (cmid_g * call.accumulator_bytes)  # mid columns that fit
    if columns < halo or _item_limit(cout_g) < 1:
        return None
    tile = min((columns - halo) // stride_w + 1, out_w, _MAX_TILE, _item_limit(cout_g))
    return tile, (tile - 1) * stride_w + halo


def _params(geom, **fields) -> dict:
    """The SeparableParams fields: the first stage's geometry plus the op's own."""
    return dict(batch=geom.batch, in_channels=geom.in_channels, in_h=geom.in_h, in_w=geom.in_w,
                out_h=geom.out_h, out_w=geom.out_w, kernel_h=geom.kernel_h, kernel_w=geom.kernel_w,
                stride_h=geom.stride[0], stride_w=geom.stride[1], pad_h=geom.pad[0], pad_w=geom.pad[1],
                dilation_h=geom.dilation[0], dilation_w=geom.dilation[1], groups=geom.groups, **fields)


# --- depthwise separable ---

def depthwise_separable_conv2d(input, depthwise_weight, pointwise_weight, depthwise_bias=None, pointwise_bias=None,
                               stride=1, padding=0, dilation=1):
    """y = conv2d(conv2d(input, depthwise_weight, depthwise_bias, stride, padding, dilation, groups=C),
    pointwise_weight, pointwise_bias), fused (the intermediate stays on chip).

    input [B, C, H, W], depthwise_weight [C*m, 1, kh, kw] (depth multiplier m >= 1:
    intermediate channel k reads input channel k // m), pointwise_weight [Cout, C*m, 1, 1],
    depthwise_bias [C*m], pointwise_bias [Cout] -> [B, Cout, Ho, Wo]."""
    op = "depthwise_separable_conv2d"
    call = Call(op, input=input, depthwise_weight=depthwise_weight, pointwise_weight=pointwise_weight,
                depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias,
                optional=("depthwise_bias", "pointwise_bias"))
    geom, cout = _depthwise_geometry(op, call, stride, padding, dilation)
    mid = geom.out_channels
    pixels = geom.out_h * geom.out_w
    tile = depthwise_tile(call, mid, cout, pixels)
    if tile is None:  # the intermediate's channels do not fit on chip even for one pixel
        first = conv2d(input, depthwise_weight, depthwise_bias, stride, padding, dilation, groups=geom.in_channels)
        return conv2d(first, pointwise_weight, pointwise_bias)
    y = call.empty((geom.batch, cout, geom.out_h, geom.out_w))
    params = _params(geom, mid_channels=mid, out_channels=cout, tile=tile, span=0)
    work = max(mid * tile, -(-cout // _OUT_PER_THREAD) * tile)
    call.launch(KERNELS, "depthwise_separable_conv2d_fwd", geom.batch * -(-pixels // tile),
                threads_for(work, _MAX_THREADS), params,
                call.operand("input"), call.operand("depthwise_weight"), call.operand("depthwise_bias"),
                call.operand("pointwise_weight"), call.operand("pointwise_bias"), y,
                shared_bytes=mid * tile * call.accumulator_bytes)
    return call.export(y)


def depthwise_separable_conv2d_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias=None,
                                        pointwise_bias=None, stride=1, padding=0, dilation=1, wrt=None):
    """Gradients of depthwise_separable_conv2d: (grad_input, grad_depthwise_weight,
    grad_pointwise_weight, grad_depthwise_bias, grad_pointwise_bias); None for an argument
    not in `wrt` (a name or tuple of names among the forward's array arguments) or that
    was None. Composed from conv2d / conv2d_backward, recomputing the intermediate."""
    op = "depthwise_separable_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, depthwise_weight=depthwise_weight,
                pointwise_weight=pointwise_weight, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias,
                optional=("depthwise_bias", "pointwise_bias"))
    geom, cout = _depthwise_geometry(op, call, stride, padding, dilation)
    check_grad_output(op, call, (geom.batch, cout, geom.out_h, geom.out_w))
    wanted = set(parse_wrt(op, wrt, DW_NAMES))
    wanted -= {n for n in ("depthwise_bias", "pointwise_bias") if call.shape(n) is None}
    if not wanted:
        return (None,) * 5
    first = wanted & {"input", "depthwise_weight", "depthwise_bias"}
    groups = geom.in_channels
    mid = conv2d(input, depthwise_weight, depthwise_bias, stride, padding, dilation, groups=groups)
    second_wrt = tuple(n for n, want in (("input", first), ("weight", "pointwise_weight" in wanted),
                                         ("bias", "pointwise_bias" in wanted)) if want)
    grad_mid, grad_pw, grad_pwb = conv2d_backward(grad_output, mid, pointwise_weight, pointwise_bias,
                                                  wrt=second_wrt)
    del mid
    grad_x = grad_dw = grad_dwb = None
    if first:
        first_wrt = tuple(n for n, arg in (("input", "input"), ("weight", "depthwise_weight"),
                                           ("bias", "depthwise_bias")) if arg in first)
        grad_x, grad_dw, grad_dwb = conv2d_backward(grad_mid, input, depthwise_weight, depthwise_bias, stride,
                                                    padding, dilation, groups=groups, wrt=first_wrt)
    return grad_x, grad_dw, grad_pw, grad_dwb, grad_pwb


# --- spatial separable ---

def spatial_separable_conv2d(input, weight_v, weight_h, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(conv2d(input, weight_v, None, (sh,1), (ph,0), (dh,1), groups),
    weight_h, bias, (1,sw), (0,pw), (1,dw), groups), fused (the intermediate stays on chip).

    input [B, Cin, H, W], weight_v [Cmid, Cin/groups, kh, 1], weight_h [Cout, Cmid/groups, 1, kw],
    bias [Cout] -> [B, Cout, Ho, Wo]. padding: an int, a pair (ph, pw), 'valid', or 'same'
    (stride 1 only: each stage 'same' along its own axis)."""
    op = "spatial_separable_conv2d"
    call = Call(op, input=input, weight_v=weight_v, weight_h=weight_h, bias=bias, optional=("bias",))
    geom, cmid = _spatial_geometry(op, call, stride, padding, dilation, groups)
    groups = geom.groups
    cout_g = geom.out_channels // groups
    planned = spatial_tile(call, cmid // groups, cout_g, geom.out_w, geom.kernel_w, geom.stride[1], geom.dilation[1])
    if planned is None:  # a one-column tile of the group's intermediate does not fit on chip
        v, h = spatial_stage_params(op, stride, padding, dilation)
        return conv2d(conv2d(input, weight_v, None, groups=groups, **v), weight_h, bias, groups=groups, **h)
    tile, span = planned
    y = call.empty(geom.output_shape)
    params = _params(geom, mid_channels=cmid, out_channels=geom.out_channels, tile=tile, span=span)
    work = max(cmid // groups * span, -(-cout_g // _OUT_PER_THREAD) * tile)
    items = geom.batch * groups * geom.out_h * -(-geom.out_w // tile)
    call.launch(KERNELS, "spatial_separable_conv2d_fwd", items, threads_for(work, _MAX_THREADS), params,
                call.operand("input"), call.operand("weight_v"), call.operand("weight_h"), call.operand("bias"), y,
                shared_bytes=cmid // groups * span * call.accumulator_bytes)
    return call.export(y)


def spatial_separable_conv2d_backward(grad_output, input, weight_v, weight_h, bias=None, stride=1, padding=0,
                                      dilation=1, groups=1, wrt=None):
    """Gradients of spatial_separable_conv2d: (grad_input, grad_weight_v, grad_weight_h,
    grad_bias); None for an argument not in `wrt` or that was None. Composed from
    conv2d / conv2d_backward, recomputing the intermediate."""
    op = "spatial_separable_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight_v=weight_v, weight_h=weight_h, bias=bias,
                optional=("bias",))
    geom, _ = _spatial_geometry(op, call, stride, padding, dilation, groups)
    check_grad_output(op, call, geom.output_shape)
    groups = geom.groups
    wanted = set(parse_wrt(op, wrt, SPATIAL_NAMES))
    if bias is None:
        wanted.discard("bias")
    if not wanted:
        return (None,) * 4
    v, h = spatial_stage_params(op, stride, padding, dilation)
    first = wanted & {"input", "weight_v"}
    mid = conv2d(input, weight_v, None, groups=groups, **v)
    second_wrt = tuple(n for n, want in (("input", first), ("weight", "weight_h" in wanted),
                                         ("bias", "bias" in wanted)) if want)
    grad_mid, grad_wh, grad_bias = conv2d_backward(grad_output, mid, weight_h, bias, groups=groups, wrt=second_wrt,
                                                   **h)
    del mid
    grad_x = grad_wv = None
    if first:
        first_wrt = tuple(n for n, arg in (("input", "input"), ("weight", "weight_v")) if arg in first)
        grad_x, grad_wv, _ = conv2d_backward(grad_mid, input, weight_v, None, groups=groups, wrt=first_wrt, **v)
    return grad_x, grad_wv, grad_wh, grad_bias


def _depthwise_output_shape(op, s, stride, padding, dilation):
    geom, cout = _depthwise_geometry(op, s, stride, padding, dilation)
    return (geom.batch, cout, geom.out_h, geom.out_w)


def _spatial_output_shape(op, s, stride, padding, dilation, groups):
    return _spatial_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


register_op(OpDef(depthwise_separable_conv2d, depthwise_separable_conv2d_backward, arrays=DW_NAMES,
                  output_shape=_depthwise_output_shape,
                  examples=(Example(dict(input=(2, 3, 7, 6), depthwise_weight=(6, 1, 3, 3), pointwise_weight=(4, 6, 1, 1),
                                         depthwise_bias=(6,), pointwise_bias=(4,)),
                                    dict(stride=(1, 2), padding=1, dilation=1)),)))
register_op(OpDef(spatial_separable_conv2d, spatial_separable_conv2d_backward, arrays=SPATIAL_NAMES,
                  output_shape=_spatial_output_shape,
                  examples=(Example(dict(input=(2, 4, 7, 6), weight_v=(4, 2, 3, 1), weight_h=(6, 2, 1, 3), bias=(6,)),
                                    dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2)),)))
