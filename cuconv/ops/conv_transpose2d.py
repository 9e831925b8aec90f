"""conv_transpose2d: torch.nn.functional.conv_transpose2d semantics, computed directly.

A transposed convolution is the adjoint of the conv2d that maps its output shape back
to its input shape ("the adjoint conv"). cuconv evaluates it as that adjoint, on the
conv2d kernels: each thread gathers the inputs that reach its output element (no
zero-inserted input, no scatter, no atomics):

  forward            y  = conv2d_bwd_input(x, w) + bias   on the adjoint conv
  grad input         gx = conv2d_fwd(gy, w)                on the adjoint conv
  grad weight        gw = conv2d_bwd_weight(x, gy)         (a correlation of x with gy)
  grad bias          gb = sum of gy over batch and pixels

`algorithm` picks the pass kernels from conv2d's algorithm table (those with
explicit-operand passes): 'direct' (kernels_cu/conv2d.cu), 'implicit_gemm' /
'implicit_gemm_tf32' (the tensor-core passes of cuconv/ops/conv2d_igemm.py, whose dgrad
is this op's forward) or 'auto'.
"""

from __future__ import annotations

import dataclasses

from .._registry import Example, OpDef, register_op
from ._common import Call, accepts_unbatched, check_grad_output, check_rank, int_pair, parse_wrt, positive_int
from .conv2d import CONV2D, ConvGeometry, launch_grad_bias, run_pass


def transposed_geometry(op: str, input_shape, weight_shape, bias_shape, stride, padding, output_padding,
                        groups, dilation) -> ConvGeometry:
    """The adjoint conv of a conv_transpose2d call (its input is the transposed output),
    after torch's checks; ValueError/TypeError naming the argument and the shapes."""
    check_rank(op, "input", input_shape, 4, "[batch, in_channels, height, width]")
    check_rank(op, "weight", weight_shape, 4, "[in_channels, out_channels/groups, kh, kw]")
    groups = positive_int(op, "groups", groups)
    stride = int_pair(op, "stride", stride, 1)
    padding = int_pair(op, "padding", padding, 0)
    output_padding = int_pair(op, "output_padding", output_padding, 0)
    dilation = int_pair(op, "dilation", dilation, 1)
    batch, cin, h, w = input_shape
    w_cin, cout_g, kh, kw = weight_shape
    shapes = f"(input {tuple(input_shape)}, weight {tuple(weight_shape)})"
    if min(cout_g, kh, kw) < 1:
        raise ValueError(f"{op}: weight has an empty dimension {shapes}")
    if w_cin != cin:
        raise ValueError(f"{op}: input has {cin} channels but weight's in_channels (dim 0) is {w_cin} {shapes}")
    if cin % groups:
        raise ValueError(f"{op}: in_channels={cin} is not divisible by groups={groups} {shapes}")
    cout = cout_g * groups
    if bias_shape is not None and tuple(bias_shape) != (cout,):
        raise ValueError(f"{op}: bias must have shape ({cout},) (weight's out_channels/groups={cout_g} x "
                         f"groups={groups}), got {tuple(bias_shape)}")
    for axis in (0, 1):
        if output_padding[axis] >= stride[axis] and output_padding[axis] >= dilation[axis]:
            raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride {stride} "
                             f"or dilation {dilation} in each dimension")
    out_h, out_w = ((n - 1) * s - 2 * p + d * (k - 1) + op_ + 1
                    for n, s, p, d, k, op_ in zip((h, w), stride, padding, dilation, (kh, kw), output_padding))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: the output would be {out_h}x{out_w} {shapes}, stride {stride}, padding {padding}, "
                         f"dilation {dilation}, output_padding {output_padding}")
    return ConvGeometry(batch=batch, in_channels=cout, in_h=out_h, in_w=out_w, out_channels=cin, out_h=h, out_w=w,
                        kernel_h=kh, kernel_w=kw, stride=stride, pad=padding, dilation=dilation, groups=groups)


def _output_shape(adjoint: ConvGeometry) -> tuple[int, int, int, int]:
    return (adjoint.batch, adjoint.in_channels, adjoint.in_h, adjoint.in_w)


@accepts_unbatched(3)
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     algorithm="auto"):
    """input [B, Cin, H, W], weight [Cin, Cout/groups, kh, kw], bias [Cout] -> [B, Cout, Hout, Wout],
    Hout = (H-1)*stride - 2*padding + dilation*(kh-1) + output_padding + 1."""
    op = "conv_transpose2d"
    call = Call(op, input=input, weight=weight, bias=bias, optional=("bias",))
    adjoint = transposed_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                                  stride, padding, output_padding, groups, dilation)
    chosen = CONV2D.check(op, algorithm, adjoint, call.dtype, passes=True)
    return run_pass(call, op, "forward", adjoint, chosen, "grad_input", _output_shape(adjoint), call.operand("input"),
                    call.operand("weight"), call.operand("bias"))


@accepts_unbatched(3)
def conv_transpose2d_backward(grad_output, input, weight, bias=None, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1, wrt=None, *, algorithm="auto"):
    """(grad_input, grad_weight, grad_bias) of conv_transpose2d; None for an argument not in
    `wrt` or that was None."""
    op = "conv_transpose2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight=weight, bias=bias, optional=("bias",))
    adjoint = transposed_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                                  stride, padding, output_padding, groups, dilation)
    chosen = CONV2D.check(op, algorithm, adjoint, call.dtype, passes=True)
    check_grad_output(op, call, _output_shape(adjoint))
    wanted = parse_wrt(op, wrt, ("input", "weight", "bias"))
    gy = call.operand("grad_output")
    gx = gw = None
    if "input" in wanted:
        gx = run_pass(call, op, "grad_input", adjoint, chosen, "forward", call.shape("input"), gy,
                      call.operand("weight"), None)
    if "weight" in wanted:
        gw = run_pass(call, op, "grad_weight", adjoint, chosen, "grad_weight", call.shape("weight"),
                      call.operand("input"), gy)
    grad_bias = None
    if "bias" in wanted and bias is not None:
        grad_bias = call.empty((adjoint.in_channels,))
        # gy is the adjoint conv's *input*; seen as an output it has these dimensions
        gy_as_output = dataclasses.replace(adjoint, out_channels=adjoint.in_channels, out_h=adjoint.in_h,
                                           out_w=adjoint.in_w)
        launch_grad_bias(call, gy_as_output, gy, grad_bias)
    return gx, gw, call.export(grad_bias)


def _output_shape_of(op, s, stride, padding, output_padding, groups, dilation, algorithm):
    return _output_shape(transposed_geometry(op, s.shape("input"), s.shape("weight"), s.shape("bias"), stride,
                                             padding, output_padding, groups, dilation))


register_op(OpDef(conv_transpose2d, conv_transpose2d_backward, arrays=("input", "weight", "bias"),
                  output_shape=_output_shape_of,
                  examples=(Example(dict(input=(2, 4, 5, 4), weight=(4, 3, 3, 2), bias=(6,)),
                                    dict(stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2))),)))
