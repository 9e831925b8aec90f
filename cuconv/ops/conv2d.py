"""conv2d: torch.nn.functional.conv2d semantics, forward and hand-written backward.

Covers stride, padding (int, pair, 'same', 'valid'), dilation, groups (grouped,
depthwise, 1x1) and an optional bias. Algorithms:
  'direct'         kernels_cu/conv2d.cu: every conv, the correctness baseline;
  'depthwise'      kernels_cu/depthwise.cu (cuconv/ops/depthwise.py): halo-tiled
                   kernels for groups == in_channels;
  'fft'            stride 1, groups 1 or depthwise (cuconv/ops/spectral.py);
  'implicit_gemm'  tensor-core kernels for float16/bfloat16 (cuconv/ops/conv2d_igemm.py;
                   stride-1 depthwise convs take the banded-Toeplitz kernels of
                   cuconv/ops/depthwise_tc.py);
  'implicit_gemm_tf32'  the same GEMMs for float32 with TF32 tensor-core math (inputs
                   rounded to 10 mantissa bits: torch's allow_tf32). It weakens the
                   float32 precision contract, so it runs only when named.
The algorithms live in the table CONV2D (cuconv/ops/_algorithms.py): this module
registers 'direct', each backend module registers its own. `algorithm='auto'` takes the
first supported entry of a fixed order (fft for kernels of at least
spectral.FFT_AUTO_MIN_TAPS taps; implicit_gemm for float16/bfloat16 on a device whose
tensor-core probes passed, where conv2d_igemm.conv2d_preferred holds; then depthwise,
then direct), or, with CUCONV_AUTOTUNE=1 on a GPU, the fastest supported algorithm
measured per shape (cuconv/_autotune.py); implicit_gemm_tf32 runs only when named.
docs/autotune.md states the rule.

conv_transpose2d and subpixel_conv2d are built from the same passes on a
ConvGeometry: the algorithms with explicit-operand passes (CONV2D.names(passes=True)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import _autotune
from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._algorithms import Algorithm, AlgorithmTable, Passes
from ._common import (Call, accepts_unbatched, check_grad_output, check_grouped_channels, check_rank, int_pair,
                      parse_wrt, positive_int, threads_for)

KERNELS = KernelModule(
    "conv2d.cu",
    kernels=("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_bwd_bias"),
    params_struct="Conv2dParams",
)
# Shared memory one block stages weights in: a tuning choice well under every
# device's per-block limit (which is read from the device and still enforced).
_WEIGHT_STAGE_BYTES = 16 * 1024


def conv_output_size(size, kernel_size, stride=1, padding=0, dilation=1):
    """floor((size + 2*padding - dilation*(kernel_size-1) - 1) / stride) + 1, elementwise
    when any argument is a tuple."""
    args = (size, kernel_size, stride, padding, dilation)
    if any(isinstance(a, (tuple, list)) for a in args):
        n = max(len(a) for a in args if isinstance(a, (tuple, list)))
        expanded = [tuple(a) if isinstance(a, (tuple, list)) else (a,) * n for a in args]
        if any(len(a) != n for a in expanded):
            raise ValueError(f"conv_output_size: tuple arguments differ in length: {args}")
        return tuple(conv_output_size(*column) for column in zip(*expanded))
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    in_channels: int
    in_h: int
    in_w: int
    out_channels: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left (bottom/right follow from out_h/out_w)
    dilation: tuple[int, int]
    groups: int
    upscale: int = 1  # pixel-shuffle factor of the output (subpixel_conv2d)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """y's shape: [B, Cout, Ho, Wo], or pixel-shuffled [B, Cout/r^2, Ho*r, Wo*r]."""
        r = self.upscale
        return (self.batch, self.out_channels // (r * r), self.out_h * r, self.out_w * r)

    def geometry_params(self) -> dict:
        """The conv geometry fields every conv-like kernel params struct starts with."""
        return dict(batch=self.batch, in_channels=self.in_channels, in_h=self.in_h, in_w=self.in_w,
                    out_channels=self.out_channels, out_h=self.out_h, out_w=self.out_w,
                    kernel_h=self.kernel_h, kernel_w=self.kernel_w,
                    stride_h=self.stride[0], stride_w=self.stride[1], pad_h=self.pad[0], pad_w=self.pad[1],
                    dilation_h=self.dilation[0], dilation_w=self.dilation[1])

    def params(self, chunk: int = 1) -> dict:
        """conv2d.cu's Conv2dParams (also the geometry part of an autotuning key)."""
        return dict(self.geometry_params(), groups=self.groups, chunk=chunk, upscale=self.upscale)


def conv_geometry(op: str, input_shape, weight_shape, bias_shape, stride, padding, dilation, groups,
                  zero_channels: bool = False) -> ConvGeometry:
    """Checks a conv2d call's shapes and parameters (torch's rules); ValueError/TypeError
    naming the argument and the shapes. zero_channels: an input with no channels (and a
    weight [Cout, 0, kh, kw]) is valid, its output the bias broadcast (conv2d)."""
    check_rank(op, "input", input_shape, 4, "[batch, in_channels, height, width]")
    check_rank(op, "weight", weight_shape, 4, "[out_channels, in_channels/groups, kh, kw]")
    groups = positive_int(op, "groups", groups)
    stride = int_pair(op, "stride", stride, 1)
    dilation = int_pair(op, "dilation", dilation, 1)
    batch, cin, h, w = input_shape
    cout, cin_g, kh, kw = weight_shape
    shapes = f"(input {tuple(input_shape)}, weight {tuple(weight_shape)})"
    if min(cout, kh, kw) < 1 or cin_g < (0 if zero_channels else 1):
        raise ValueError(f"{op}: weight has an empty dimension {shapes}")
    check_grouped_channels(op, "weight", cin, cin_g, cout, groups, "out_channels", shapes)
    if bias_shape is not None and tuple(bias_shape) != (cout,):
        raise ValueError(f"{op}: bias must have shape ({cout},) to match weight {tuple(weight_shape)}, "
                         f"got {tuple(bias_shape)}")
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad_before, pad_total = (0, 0), (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' requires stride 1 (as in torch), got stride {stride}")
            pad_total = (span[0] - 1, span[1] - 1)
            pad_before = (pad_total[0] // 2, pad_total[1] // 2)  # torch puts the odd one at the end
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pad_before = int_pair(op, "padding", padding, 0)
        pad_total = (2 * pad_before[0], 2 * pad_before[1])
    padded = (h + pad_total[0], w + pad_total[1])
    if span[0] > padded[0] or span[1] > padded[1]:
        raise ValueError(f"{op}: kernel (dilated extent {span[0]}x{span[1]}) is larger than the padded input "
                         f"{padded[0]}x{padded[1]} {shapes}, padding {padding!r}, dilation {dilation}")
    out_h = (padded[0] - span[0]) // stride[0] + 1
    out_w = (padded[1] - span[1]) // stride[1] + 1
    return ConvGeometry(batch, cin, h, w, cout, out_h, out_w, kh, kw, stride, pad_before, dilation, groups)


def _tuning_key(call: Call, op: str, stage: str, geom: ConvGeometry, has_bias: bool) -> str:
    return _autotune.make_key(call, op, stage, dict(geom.params(), bias=has_bias))


def _launch_per_pixel(call: Call, kernel: str, geom: ConvGeometry, planes: int, pixels: int,
                      staged_entries: int, *arrays) -> None:
    """conv2d_fwd / conv2d_bwd_input: one thread per pixel of `planes` planes, the
    block's `staged_entries` weights staged through shared memory in bounded chunks."""
    block = threads_for(pixels)
    budget = min(_WEIGHT_STAGE_BYTES, call.max_shared_bytes())
    chunk = max(1, min(staged_entries, budget // call.accumulator_bytes))
    call.launch(KERNELS, kernel, planes * -(-pixels // block), block, geom.params(chunk), *arrays,
                shared_bytes=chunk * call.accumulator_bytes)


# The four kernels on a ConvGeometry. conv2d, conv_transpose2d (on the adjoint conv's
# geometry) and subpixel_conv2d (upscale > 1) are each a few calls of these.

def launch_forward(call: Call, geom: ConvGeometry, x, w, bias, y) -> None:
    """y = conv(x, w) + bias."""
    _launch_per_pixel(call, "conv2d_fwd", geom, geom.batch * geom.out_channels, geom.out_h * geom.out_w,
                      geom.in_channels // geom.groups * geom.kernel_h * geom.kernel_w, x, w, bias, y)


def launch_grad_input(call: Call, geom: ConvGeometry, grad_y, w, bias, grad_x) -> None:
    """grad_x = conv's input gradient of grad_y (+ bias per input channel, when given)."""
    _launch_per_pixel(call, "conv2d_bwd_input", geom, geom.batch * geom.in_channels, geom.in_h * geom.in_w,
                      geom.out_channels // geom.groups * geom.kernel_h * geom.kernel_w, grad_y, w, bias, grad_x)


def _reduction_block(geom: ConvGeometry) -> int:
    return threads_for(geom.batch * geom.out_h * geom.out_w)


def launch_grad_weight(call: Call, geom: ConvGeometry, grad_y, x, grad_w) -> None:
    items = geom.out_channels * (geom.in_channels // geom.groups) * geom.kernel_h * geom.kernel_w
    call.launch(KERNELS, "conv2d_bwd_weight", items, _reduction_block(geom), geom.params(), grad_y, x, grad_w)


def launch_grad_bias(call: Call, geom: ConvGeometry, grad_y, grad_bias) -> None:
    """grad_bias[o] = sum of grad_y over batch and pixels; grad_y has geom's output shape."""
    call.launch(KERNELS, "conv2d_bwd_bias", geom.out_channels, _reduction_block(geom), geom.params(),
                grad_y, grad_bias)


# conv2d's algorithms. This module registers 'direct'; the modules that own the other
# kernels (depthwise, spectral, conv2d_igemm) register theirs. conv_transpose2d and
# subpixel_conv2d run on the algorithms with explicit-operand passes (passes=True).
CONV2D = AlgorithmTable("conv2d")


def run_passes(call: Call, op: str, stage: str, geom: ConvGeometry, algorithm: str, run: Callable):
    """run(algorithm) for a checked pass `algorithm`; for 'auto', the untuned choice
    (implicit_gemm where the tensor cores are verified and it is preferred, else 'direct')
    or, tuned, the fastest supported pass algorithm (never tf32)."""
    key = _autotune.make_key(call, op, stage, geom.params()) if algorithm == "auto" else ""
    return run(CONV2D.resolve(call, key, geom, algorithm, run, passes=True))


def run_pass(call: Call, op: str, stage: str, geom: ConvGeometry, algorithm: str, which: str, out_shape, *operands):
    """One conv pass into a new array of `out_shape`, exported: `which` is 'forward',
    'grad_input' or 'grad_weight' of the algorithm's Passes, the operands kernel-side
    arrays (call.operand); the algorithm is a checked pass algorithm or 'auto' (run_passes)."""
    def run(algorithm):
        out = call.empty(out_shape)
        getattr(CONV2D[algorithm].passes, which)(call, geom, *operands, out)
        return call.export(out)

    return run_passes(call, op, stage, geom, algorithm, run)


@accepts_unbatched(3)
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """y = conv2d(input [B, Cin, H, W], weight [Cout, Cin/groups, kh, kw], bias [Cout])
    -> [B, Cout, Ho, Wo], as torch.nn.functional.conv2d."""
    op = "conv2d"
    call = Call(op, input=input, weight=weight, bias=bias, optional=("bias",))
    geom = conv_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups, zero_channels=True)
    chosen = CONV2D.check(op, algorithm, geom, call.dtype)
    forward = lambda a: CONV2D[a].forward(call, geom)  # noqa: E731
    if chosen == "auto":
        chosen = CONV2D.resolve(call, _tuning_key(call, op, "forward", geom, bias is not None), geom, chosen,
                                forward)
    return forward(chosen)


@accepts_unbatched(3)
def conv2d_backward(grad_output, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                    wrt=None, *, algorithm="auto"):
    """Gradients of conv2d: (grad_input, grad_weight, grad_bias); None for an argument
    not in `wrt` (a name or tuple of names among input, weight, bias) or that was None."""
    op = "conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight=weight, bias=bias, optional=("bias",))
    geom = conv_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups, zero_channels=True)
    chosen = CONV2D.check(op, algorithm, geom, call.dtype)
    check_grad_output(op, call, geom.output_shape)
    wanted = parse_wrt(op, wrt, ("input", "weight", "bias"))
    has_bias = bias is not None
    if chosen != "auto":
        return CONV2D[chosen].gradients(call, geom, wanted, has_bias)
    candidates = CONV2D.candidates(geom, call.dtype, call=call)
    if not _autotune.tuning_enabled(call):
        return CONV2D[candidates[0]].gradients(call, geom, wanted, has_bias)
    # Tuned: each of the input and weight gradients by its own fastest algorithm.
    grads = {}
    for stage in ("input", "weight"):
        if stage in wanted:
            run = lambda a, stage=stage: CONV2D[a].gradients(call, geom, {stage}, False)
            key = _tuning_key(call, op, "grad_" + stage, geom, has_bias)
            grads[stage] = run(_autotune.choose(call, key, candidates, run))[("input", "weight").index(stage)]
    grad_bias = None
    if "bias" in wanted and has_bias:
        grad_bias = call.empty((geom.out_channels,))
        launch_grad_bias(call, geom, call.operand("grad_output"), grad_bias)
    return grads.get("input"), grads.get("weight"), call.export(grad_bias)


def conv_gradients(call: Call, geom: ConvGeometry, wanted, has_bias: bool, algorithm: str = "direct"):
    """(grad_input, grad_weight, grad_bias) of a conv on `geom` (conv2d, subpixel_conv2d) as
    the caller's arrays, by a checked pass algorithm or 'auto' (each gradient then chosen
    on its own: run_passes); `call` holds grad_output, input and weight."""
    gy = call.operand("grad_output")
    gx = gw = None
    if "input" in wanted:
        gx = run_pass(call, call.op, "grad_input", geom, algorithm, "grad_input",
                      (geom.batch, geom.in_channels, geom.in_h, geom.in_w), gy, call.operand("weight"), None)
    if "weight" in wanted:
        gw = run_pass(call, call.op, "grad_weight", geom, algorithm, "grad_weight", call.shape("weight"), gy,
                      call.operand("input"))
    grad_bias = None
    if "bias" in wanted and has_bias:
        grad_bias = call.empty((geom.out_channels,))
        launch_grad_bias(call, geom, gy, grad_bias)
    return gx, gw, call.export(grad_bias)


def _direct_forward(call: Call, geom: ConvGeometry):
    y = call.empty(geom.output_shape)
    launch_forward(call, geom, call.operand("input"), call.operand("weight"), call.operand("bias"), y)
    return call.export(y)


CONV2D.register(Algorithm("direct", lambda geom, dtype: None, forward=_direct_forward, gradients=conv_gradients,
                          passes=Passes(launch_forward, launch_grad_input, launch_grad_weight), rank=2,
                          zero_channels=True))


def _output_shape(op, s, stride, padding, dilation, groups, algorithm):
    return conv_geometry(op, s.shape("input"), s.shape("weight"), s.shape("bias"), stride, padding, dilation,
                         groups, zero_channels=True).output_shape


register_op(OpDef(conv2d, conv2d_backward, arrays=("input", "weight", "bias"), output_shape=_output_shape,
                  examples=(Example(dict(input=(2, 4, 7, 6), weight=(6, 2, 3, 2), bias=(6,)),
                                    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
                            Example(dict(input=(2, 3, 6, 7), weight=(6, 1, 3, 3), bias=(6,)),
                                    dict(padding=1, groups=3)))))
