"""subpixel_conv2d: pixel_shuffle(conv2d(...), r) in one pass.

The conv kernels write (and, in backward, read) the conv output at its
pixel-shuffled position (kernels_cu/conv2d.cu, `upscale`), so neither the unshuffled
[B, C*r^2, H, W] result nor an unshuffled gradient ever exists in memory.
"""

from __future__ import annotations

import dataclasses

from .._registry import Example, OpDef, ShapeArgs, register_op
from ._common import Call, check_grad_output, parse_wrt, positive_int
from .conv2d import CONV2D, conv_geometry, conv_gradients, run_pass


def _geometry(op: str, call: Call | ShapeArgs, upscale_factor, stride, padding, dilation, groups):
    r = positive_int(op, "upscale_factor", upscale_factor)
    geom = conv_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups)
    if geom.out_channels % (r * r):
        raise ValueError(f"{op}: weight's out_channels={geom.out_channels} must be divisible by "
                         f"upscale_factor**2={r * r} (weight {call.shape('weight')})")
    return dataclasses.replace(geom, upscale=r)


def subpixel_conv2d(input, weight, bias=None, upscale_factor=2, stride=1, padding=0, dilation=1, groups=1, *,
                    algorithm="auto"):
    """pixel_shuffle(conv2d(input, weight, bias, stride, padding, dilation, groups), upscale_factor):
    input [B, Cin, H, W], weight [C*r^2, Cin/groups, kh, kw] -> [B, C, Ho*r, Wo*r].
    algorithm: 'auto', or one of conv2d's algorithms with explicit-operand passes
    ('direct', 'implicit_gemm', 'implicit_gemm_tf32'), as for conv2d."""
    op = "subpixel_conv2d"
    call = Call(op, input=input, weight=weight, bias=bias, optional=("bias",))
    geom = _geometry(op, call, upscale_factor, stride, padding, dilation, groups)
    chosen = CONV2D.check(op, algorithm, geom, call.dtype, passes=True)
    return run_pass(call, op, "forward", geom, chosen, "forward", geom.output_shape, call.operand("input"),
                    call.operand("weight"), call.operand("bias"))


def subpixel_conv2d_backward(grad_output, input, weight, bias=None, upscale_factor=2, stride=1, padding=0,
                             dilation=1, groups=1, wrt=None, *, algorithm="auto"):
    """(grad_input, grad_weight, grad_bias) of subpixel_conv2d; grad_output has the
    shuffled output's shape and is read in place (no unshuffled copy)."""
    op = "subpixel_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight=weight, bias=bias, optional=("bias",))
    geom = _geometry(op, call, upscale_factor, stride, padding, dilation, groups)
    chosen = CONV2D.check(op, algorithm, geom, call.dtype, passes=True)
    check_grad_output(op, call, geom.output_shape)
    wanted = parse_wrt(op, wrt, ("input", "weight", "bias"))
    return conv_gradients(call, geom, wanted, bias is not None, chosen)


def _output_shape(op, s, upscale_factor, stride, padding, dilation, groups, algorithm):
    return _geometry(op, s, upscale_factor, stride, padding, dilation, groups).output_shape


register_op(OpDef(subpixel_conv2d, subpixel_conv2d_backward, arrays=("input", "weight", "bias"),
                  output_shape=_output_shape,
                  examples=(Example(dict(input=(2, 3, 5, 4), weight=(8, 3, 3, 3), bias=(8,)),
                                    dict(upscale_factor=2, padding=1)),)))
