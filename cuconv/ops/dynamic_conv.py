"""Dynamic (input-conditioned) convolutions, forward and hand-written backward, fused:

- dynamic_conv2d (CondConv, DY-CNN): y[b] = conv(x[b], sum_k a[b,k] W_k) + sum_k a[b,k] bias_k
- odconv2d (ODConv): y[b] = fa[b] * conv(ca[b] * x[b], sum_k ka[b,k] * (sa[b] * W_k))
- warehouse_conv2d (KernelWarehouse): the kernel tiled into S slots, each a mixture of n cells

All three run on one kernel family (kernels_cu/dynamic_conv.cu, formulas and thread
mapping documented there): dynamic_conv2d and odconv2d are its one-slot case. The
per-sample kernel is aggregated on chip inside the convolution and never stored: no
array of B * Cout * Cin/groups * kh * kw elements is ever allocated, forward or
backward. The attention normalisations (sigmoid, temperature softmax, ...) stay
outside the op.

Workspaces (accumulator dtype: float32, float64 for float64 inputs), backward only,
each allocated only when its gradient is wanted, with T = ceil(Ho*Wo / block) and
T_in = ceil(H*W / block_in) pixel tiles per plane (block, block_in = the pixel count
rounded up to a warp, at most 256):
  attention gradient          B * S * n * co * T   (dynamic/ODConv: B * K * Cout * T)
  filter attention gradient   B * Cout * T
  spatial attention gradient  B * kh * kw * Cout * T
  channel attention gradient  B * Cin * T_in
Each is reduced to its gradient by a second kernel in a fixed order (deterministic).

dynamic_conv2d / dynamic_conv2d_backward (only those two) take `algorithm`:
'direct' (the kernels above), 'implicit_gemm' (float16 / bfloat16: the forward and the
INPUT gradient on the tensor cores, kernels_cu/conv2d_igemm.cu's conv2d_igemm_dynamic_fwd
/ _bwd_input, sample b's kernel mixed in the implicit GEMM's B-tile loader and rounded
once to the storage dtype; the weight, attention and bias gradients stay on the direct
kernels above; no workspace, nothing mixed-kernel-sized allocated) or 'auto' (untuned:
'implicit_gemm' for float16 / bfloat16 on a device whose fragment probes passed when each
group has more than one input channel (conv2d_igemm.gemm_preferred), else 'direct'; with
CUCONV_AUTOTUNE=1 on a GPU the faster of the two, forward and input gradient tuned
separately).
dynamic_implicit_gemm_supported(geom, dtype) says whether 'implicit_gemm' can run a conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from .. import _arrays, _autotune
from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._algorithms import Algorithm, AlgorithmTable
from ._common import Call, check_grad_output, check_rank, describe_shapes, parse_wrt, positive_int, threads_for
from .conv2d import ConvGeometry, conv_geometry
from .conv2d_igemm import (dynamic_implicit_gemm_supported, gemm_preferred, launch_igemm_dynamic_forward,
                           launch_igemm_dynamic_grad_input)

KERNELS = KernelModule(
    "dynamic_conv.cu",
    kernels=("dynamic_conv2d_fwd", "dynamic_conv2d_bwd_input", "dynamic_conv2d_bwd_weight", "dynamic_conv2d_bwd_bias",
             "dynamic_conv2d_bwd_attention", "dynamic_conv2d_bwd_spatial_attention", "dynamic_conv2d_reduce"),
    params_struct="DynamicConvParams",
)
# Shared memory one block stages its per-sample kernel entries in (as conv2d): a tuning
# choice well under every device's per-block limit (which is read and still enforced).
_WEIGHT_STAGE_BYTES = 16 * 1024

DYNAMIC_NAMES = ("input", "weight", "attention", "bias")
ODCONV_NAMES = ("input", "weight", "kernel_attention", "spatial_attention", "channel_attention", "filter_attention")
WAREHOUSE_NAMES = ("input", "cells", "attention")


@dataclass(frozen=True)
class Mixture:
    """How the per-sample kernel is built: S slots, each a mixture of n cells [co, ci, ckh, ckw]."""

    cells: int
    cell_out: int
    cell_in: int
    cell_h: int
    cell_w: int
    slots: int

    @property
    def cell_size(self) -> int:
        return self.cell_out * self.cell_in * self.cell_h * self.cell_w


def _params(geom: ConvGeometry, mix: Mixture, chunk: int = 1, rows: int = 0, cols: int = 0) -> dict:
    return dict(geom.geometry_params(), groups=geom.groups, cells=mix.cells, cell_out=mix.cell_out, cell_in=mix.cell_in,
                cell_h=mix.cell_h, cell_w=mix.cell_w, slots=mix.slots, chunk=chunk, rows=rows, cols=cols)


# --- validation ---

def _check_rank(op: str, call: Call, name: str, rank: int, layout: str) -> tuple[int, ...]:
    return check_rank(op, name, call.shape(name), rank, layout)


def _check_shape(op: str, call: Call, name: str, expected, names) -> None:
    got = call.shape(name)
    if got is not None and got != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {got} ({describe_shapes(call, names)})")


def _kernel_bank_geometry(op: str, call: Call, weight: str, names, stride, padding, dilation, groups):
    """input [B, Cin, H, W] and a bank `weight` [K, Cout, Cin/groups, kh, kw]: the conv's
    geometry and K."""
    _check_rank(op, call, "input", 4, "[batch, in_channels, height, width]")
    k, cout, cin_g, kh, kw = _check_rank(op, call, weight, 5, "[K, out_channels, in_channels/groups, kh, kw]")
    if k < 1:
        raise ValueError(f"{op}: {weight} has no kernels (K = 0) ({describe_shapes(call, names)})")
    geom = conv_geometry(op, call.shape("input"), (cout, cin_g, kh, kw), None, stride, padding, dilation, groups)
    return geom, k


def _dynamic_geometry(op: str, call: Call, stride, padding, dilation, groups):
    names = ("grad_output",) + DYNAMIC_NAMES
    geom, k = _kernel_bank_geometry(op, call, "weight", names, stride, padding, dilation, groups)
    _check_shape(op, call, "attention", (geom.batch, k), names)
    _check_shape(op, call, "bias", (k, geom.out_channels), names)
    return geom, Mixture(k, geom.out_channels, geom.in_channels // geom.groups, geom.kernel_h, geom.kernel_w, 1)


def _odconv_geometry(op: str, call: Call, stride, padding, dilation, groups):
    names = ("grad_output",) + ODCONV_NAMES
    geom, k = _kernel_bank_geometry(op, call, "weight", names, stride, padding, dilation, groups)
    b = geom.batch
    _check_shape(op, call, "kernel_attention", (b, k), names)
    _check_shape(op, call, "spatial_attention", (b, geom.kernel_h, geom.kernel_w), names)
    _check_shape(op, call, "channel_attention", (b, geom.in_channels), names)
    _check_shape(op, call, "filter_attention", (b, geom.out_channels), names)
    return geom, Mixture(k, geom.out_channels, geom.in_channels // geom.groups, geom.kernel_h, geom.kernel_w, 1)


def _warehouse_geometry(op: str, call: Call, kernel_shape, stride, padding, dilation, groups):
    names = ("grad_output",) + WAREHOUSE_NAMES
    _check_rank(op, call, "input", 4, "[batch, in_channels, height, width]")
    n, co, ci, ckh, ckw = _check_rank(op, call, "cells", 5, "[n, cell_out, cell_in, cell_h, cell_w]")
    if kernel_shape is None:
        raise TypeError(f"{op}: kernel_shape=(out_channels, in_channels/groups, kh, kw) is required "
                        f"({describe_shapes(call, names)})")
    try:
        kernel_shape = tuple(kernel_shape)
    except TypeError:
        raise TypeError(f"{op}: kernel_shape must be a tuple of 4 ints, got {kernel_shape!r}") from None
    if len(kernel_shape) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in kernel_shape):
        raise TypeError(f"{op}: kernel_shape must be a tuple of 4 ints (out_channels, in_channels/groups, kh, kw), "
                        f"got {kernel_shape!r}")
    kernel_shape = tuple(int(v) for v in kernel_shape)
    if min(n, co, ci, ckh, ckw) < 1:
        raise ValueError(f"{op}: cells has an empty dimension ({describe_shapes(call, names)})")
    if min(kernel_shape) < 1:
        raise ValueError(f"{op}: kernel_shape {kernel_shape} has an empty dimension")
    if any(size % cell for size, cell in zip(kernel_shape, (co, ci, ckh, ckw))):
        raise ValueError(f"{op}: cells of shape {(co, ci, ckh, ckw)} do not tile kernel_shape {kernel_shape}: "
                         f"each kernel dimension must be a multiple of the cell's ({describe_shapes(call, names)})")
    groups = positive_int(op, "groups", groups)
    cin = call.shape("input")[1]
    if cin != kernel_shape[1] * groups:
        raise ValueError(f"{op}: input has {cin} channels but kernel_shape expects in_channels/groups="
                         f"{kernel_shape[1]} x groups={groups} = {kernel_shape[1] * groups} ({describe_shapes(call, names)})")
    if kernel_shape[0] % groups:
        raise ValueError(f"{op}: kernel_shape's out_channels={kernel_shape[0]} is not divisible by groups={groups} "
                         f"({describe_shapes(call, names)})")
    geom = conv_geometry(op, call.shape("input"), kernel_shape, None, stride, padding, dilation, groups)
    slots = (kernel_shape[0] // co) * (kernel_shape[1] // ci) * (kernel_shape[2] // ckh) * (kernel_shape[3] // ckw)
    _check_shape(op, call, "attention", (geom.batch, slots, n), names)
    return geom, Mixture(n, co, ci, ckh, ckw, slots)


# --- launches ---

def _workspace(call: Call, size: int):
    """A flat accumulator-typed workspace (float32, float64 for float64 inputs)."""
    dtype = "float64" if call.dtype == "float64" else "float32"
    return _arrays.empty(call.anchor, (size,), on_host=call.backend == "interpret", dtype=dtype)


def _launch_staged(call: Call, kernel: str, geom: ConvGeometry, mix: Mixture, planes: int, pixels: int,
                   staged_entries: int, *arrays) -> int:
    """_fwd / _bwd_input: one thread per pixel of `planes` planes, the block's per-sample
    kernel entries computed into shared memory in bounded chunks. Returns the block size."""
    block = threads_for(pixels)
    budget = min(_WEIGHT_STAGE_BYTES, call.max_shared_bytes())
    chunk = max(1, min(staged_entries, budget // call.accumulator_bytes))
    call.launch(KERNELS, kernel, planes * -(-pixels // block), block, _params(geom, mix, chunk), *arrays,
                shared_bytes=chunk * call.accumulator_bytes)
    return block


def _reduce(call: Call, geom: ConvGeometry, mix: Mixture, ws, rows: int, cols: int, out) -> None:
    """out (rows elements) = the row sums of ws [rows, cols], in a fixed order."""
    call.launch(KERNELS, "dynamic_conv2d_reduce", rows, threads_for(cols), _params(geom, mix, rows=rows, cols=cols),
                ws, out)


def _forward(call: Call, geom: ConvGeometry, mix: Mixture, cells: str, att: str, sa=None, ca=None, fa=None,
             bias=None):
    y = call.empty(geom.output_shape)
    _launch_staged(call, "dynamic_conv2d_fwd", geom, mix, geom.batch * geom.out_channels, geom.out_h * geom.out_w,
                   geom.in_channels // geom.groups * geom.kernel_h * geom.kernel_w,
                   call.operand("input"), call.operand(cells), call.operand(att), call.operand(sa) if sa else None,
                   call.operand(ca) if ca else None, call.operand(fa) if fa else None,
                   call.operand(bias) if bias else None, y)
    return y


def _gradients(call: Call, geom: ConvGeometry, mix: Mixture, roles: dict, wanted) -> dict:
    """The gradients named in `wanted` (roles: input, cells, attention, sa, ca, fa, bias),
    as the caller's arrays. `roles` maps each role to the argument name holding it (None
    when the op has no such argument or it was None)."""
    def operand(role):
        return call.operand(roles[role]) if roles.get(role) else None

    gy, x, cells, att = call.operand("grad_output"), call.operand("input"), operand("cells"), operand("attention")
    sa, ca, fa, bias = operand("sa"), operand("ca"), operand("fa"), operand("bias")
    out = {}
    b, cin, cout = geom.batch, geom.in_channels, geom.out_channels
    in_pixels, out_pixels = geom.in_h * geom.in_w, geom.out_h * geom.out_w
    if "input" in wanted or "ca" in wanted:
        grad_x = call.empty((b, cin, geom.in_h, geom.in_w)) if "input" in wanted else None
        tiles_in = -(-in_pixels // threads_for(in_pixels))
        ws = _workspace(call, b * cin * tiles_in) if "ca" in wanted else None
        _launch_staged(call, "dynamic_conv2d_bwd_input", geom, mix, b * cin, in_pixels,
                       cout // geom.groups * geom.kernel_h * geom.kernel_w, gy, x, cells, att, sa, ca, fa, grad_x, ws)
        if grad_x is not None:
            out["input"] = grad_x
        if ws is not None:
            out["ca"] = call.empty((b, cin))
            _reduce(call, geom, mix, ws, b * cin, tiles_in, out["ca"])
    if "cells" in wanted:
        out["cells"] = call.empty((mix.cells, mix.cell_out, mix.cell_in, mix.cell_h, mix.cell_w))
        call.launch(KERNELS, "dynamic_conv2d_bwd_weight", mix.cell_size, threads_for(mix.slots * b * out_pixels),
                    _params(geom, mix), gy, x, att, sa, ca, fa, out["cells"])
    if "bias" in wanted:
        out["bias"] = call.empty((mix.cells, cout))
        call.launch(KERNELS, "dynamic_conv2d_bwd_bias", cout, threads_for(b * out_pixels), _params(geom, mix),
                    gy, att, out["bias"])
    block = threads_for(out_pixels)
    tiles = -(-out_pixels // block)
    if "attention" in wanted or "fa" in wanted:
        ws_att = _workspace(call, b * mix.slots * mix.cells * mix.cell_out * tiles) if "attention" in wanted else None
        ws_fa = _workspace(call, b * cout * tiles) if "fa" in wanted else None
        call.launch(KERNELS, "dynamic_conv2d_bwd_attention", b * cout * tiles, block, _params(geom, mix),
                    gy, x, cells, att, sa, ca, fa, bias, ws_att, ws_fa)
        if ws_att is not None:
            out["attention"] = call.empty(call.shape(roles["attention"]))
            _reduce(call, geom, mix, ws_att, b * mix.slots * mix.cells, mix.cell_out * tiles, out["attention"])
        if ws_fa is not None:
            out["fa"] = call.empty((b, cout))
            _reduce(call, geom, mix, ws_fa, b * cout, tiles, out["fa"])
    if "sa" in wanted:
        taps = geom.kernel_h * geom.kernel_w
        ws = _workspace(call, b * taps * cout * tiles)
        call.launch(KERNELS, "dynamic_conv2d_bwd_spatial_attention", b * cout * tiles, block, _params(geom, mix),
                    gy, x, cells, att, ca, fa, ws)
        out["sa"] = call.empty((b, geom.kernel_h, geom.kernel_w))
        _reduce(call, geom, mix, ws, b * taps, cout * tiles, out["sa"])
    return {role: call.export(a) for role, a in out.items()}


def _wanted_roles(op: str, wrt, names: tuple[str, ...], roles: dict, call: Call) -> set:
    """The roles to differentiate: `wrt` names arguments; None arguments are dropped."""
    by_name = {name: role for role, name in roles.items()}
    return {by_name[n] for n in parse_wrt(op, wrt, names) if call.shape(n) is not None}


# --- dynamic_conv2d ---

def _direct_forward(call: Call, geom: ConvGeometry, mix: Mixture):
    bias = "bias" if call.shape("bias") is not None else None
    return call.export(_forward(call, geom, mix, "weight", "attention", bias=bias))


def _igemm_forward(call: Call, geom: ConvGeometry, mix: Mixture):
    y = call.empty(geom.output_shape)
    launch_igemm_dynamic_forward(call, geom, call.operand("input"), call.operand("weight"),
                                 call.operand("attention"), call.operand("bias"), y)
    return call.export(y)


def _direct_grad_input(call: Call, geom: ConvGeometry, mix: Mixture, roles: dict):
    return _gradients(call, geom, mix, roles, {"input"})["input"]


def _igemm_grad_input(call: Call, geom: ConvGeometry, mix: Mixture, roles: dict):
    grad_x = call.empty((geom.batch, geom.in_channels, geom.in_h, geom.in_w))
    launch_igemm_dynamic_grad_input(call, geom, call.operand("grad_output"), call.operand("weight"),
                                    call.operand("attention"), grad_x)
    return call.export(grad_x)


# dynamic_conv2d's algorithms: forward(call, geom, mix) and, as `gradients`, the INPUT
# gradient (call, geom, mix, roles); the other gradients are always the direct kernels'.
# 'auto' untuned: 'implicit_gemm' where the probes passed and gemm_preferred holds, else 'direct'.
DYNAMIC = AlgorithmTable("dynamic_conv2d")
DYNAMIC.register(Algorithm("direct", lambda geom, dtype: None, forward=_direct_forward, gradients=_direct_grad_input,
                           rank=1))
DYNAMIC.register(Algorithm("implicit_gemm", dynamic_implicit_gemm_supported, forward=_igemm_forward,
                           gradients=_igemm_grad_input, rank=2, preferred=gemm_preferred, tensor_cores=True))


def _resolve(call: Call, op: str, stage: str, geom: ConvGeometry, algorithm: str, run) -> str:
    if algorithm != "auto":
        return algorithm
    key = _autotune.make_key(call, op, stage, dict(geom.params(), kernels=call.shape("weight")[0]))
    return DYNAMIC.resolve(call, key, geom, algorithm, run)


def dynamic_conv2d(input, weight, attention, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                   algorithm="auto"):
    """y[b] = conv2d(input[b], sum_k attention[b,k] * weight[k], sum_k attention[b,k] * bias[k], stride,
    padding, dilation, groups), fused (the per-sample kernel is mixed on chip).

    input [B, Cin, H, W], weight [K, Cout, Cin/groups, kh, kw], attention [B, K] (already
    normalised: CondConv's sigmoid, DY-CNN's temperature softmax), bias [K, Cout]
    -> [B, Cout, Ho, Wo]. stride/padding/dilation/groups as torch's conv2d.

    algorithm: 'direct' (dynamic_conv.cu), 'implicit_gemm' (float16 / bfloat16 only:
    tensor-core implicit GEMM, the mixed kernel built in the B-tile loader as a float32
    sum rounded once to the input dtype, as if materialised in that dtype), or 'auto'
    (untuned: 'implicit_gemm' for float16 / bfloat16 on a device whose tensor-core probes
    passed, when each group has more than one input channel, else 'direct'; with
    CUCONV_AUTOTUNE=1 on a GPU the faster of the two for the shape)."""
    op = "dynamic_conv2d"
    call = Call(op, input=input, weight=weight, attention=attention, bias=bias, optional=("bias",))
    geom, mix = _dynamic_geometry(op, call, stride, padding, dilation, groups)
    chosen = DYNAMIC.check(op, algorithm, geom, call.dtype)
    run = lambda a: DYNAMIC[a].forward(call, geom, mix)  # noqa: E731
    return run(_resolve(call, op, "forward", geom, chosen, run))


def dynamic_conv2d_backward(grad_output, input, weight, attention, bias=None, stride=1, padding=0, dilation=1,
                            groups=1, wrt=None, *, algorithm="auto"):
    """Gradients of dynamic_conv2d: (grad_input, grad_weight, grad_attention, grad_bias);
    None for an argument not in `wrt` (a name or tuple of names among input, weight,
    attention, bias) or that was None.

    algorithm: as dynamic_conv2d's. With 'implicit_gemm' only the INPUT gradient runs on
    the tensor cores (conv2d_igemm_dynamic_bwd_input, mixed kernel rounded once to the
    dtype); the weight, attention and bias gradients are always the direct kernels'
    (bitwise the same as with algorithm='direct'). Under 'auto' with tuning on, only the
    input gradient's algorithm is tuned."""
    op = "dynamic_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight=weight, attention=attention, bias=bias,
                optional=("bias",))
    geom, mix = _dynamic_geometry(op, call, stride, padding, dilation, groups)
    check_grad_output(op, call, geom.output_shape)
    roles = dict(input="input", cells="weight", attention="attention", bias="bias" if bias is not None else None)
    wanted = _wanted_roles(op, wrt, DYNAMIC_NAMES, roles, call)
    chosen = DYNAMIC.check(op, algorithm, geom, call.dtype)
    input_gradient = lambda a: DYNAMIC[a].gradients(call, geom, mix, roles)  # noqa: E731
    grad_input = None
    if "input" in wanted:
        chosen = _resolve(call, op, "grad_input", geom, chosen, input_gradient)
        if chosen == "implicit_gemm":  # the other gradients are the direct kernels' either way
            wanted = wanted - {"input"}
            grad_input = input_gradient(chosen)
    grads = _gradients(call, geom, mix, roles, wanted)
    if grad_input is not None:
        grads["input"] = grad_input
    return tuple(grads.get(role) for role in ("input", "cells", "attention", "bias"))


# --- odconv2d ---

def odconv2d(input, weight, kernel_attention, spatial_attention=None, channel_attention=None, filter_attention=None,
             stride=1, padding=0, dilation=1, groups=1):
    """ODConv: y[b] = fa[b] * conv2d(ca[b] * input[b], sum_k ka[b,k] * (sa[b] * weight[k])), fused
    (ca folded into the input loads, the mixed kernel built on chip, fa in the epilogue).

    input [B, Cin, H, W], weight [K, Cout, Cin/groups, kh, kw], kernel_attention ka [B, K],
    spatial_attention sa [B, kh, kw], channel_attention ca [B, Cin], filter_attention
    fa [B, Cout] (each optional attention None = ones) -> [B, Cout, Ho, Wo]. No bias."""
    op = "odconv2d"
    call = Call(op, input=input, weight=weight, kernel_attention=kernel_attention,
                spatial_attention=spatial_attention, channel_attention=channel_attention,
                filter_attention=filter_attention,
                optional=("spatial_attention", "channel_attention", "filter_attention"))
    geom, mix = _odconv_geometry(op, call, stride, padding, dilation, groups)
    given = lambda name: name if call.shape(name) is not None else None  # noqa: E731
    y = _forward(call, geom, mix, "weight", "kernel_attention", given("spatial_attention"),
                 given("channel_attention"), given("filter_attention"))
    return call.export(y)


def odconv2d_backward(grad_output, input, weight, kernel_attention, spatial_attention=None, channel_attention=None,
                      filter_attention=None, stride=1, padding=0, dilation=1, groups=1, wrt=None):
    """Gradients of odconv2d: (grad_input, grad_weight, grad_kernel_attention,
    grad_spatial_attention, grad_channel_attention, grad_filter_attention); None for an
    argument not in `wrt` or that was None."""
    op = "odconv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, weight=weight, kernel_attention=kernel_attention,
                spatial_attention=spatial_attention, channel_attention=channel_attention,
                filter_attention=filter_attention,
                optional=("spatial_attention", "channel_attention", "filter_attention"))
    geom, mix = _odconv_geometry(op, call, stride, padding, dilation, groups)
    check_grad_output(op, call, geom.output_shape)
    given = lambda name: name if call.shape(name) is not None else None  # noqa: E731
    roles = dict(input="input", cells="weight", attention="kernel_attention", sa=given("spatial_attention"),
                 ca=given("channel_attention"), fa=given("filter_attention"))
    grads = _gradients(call, geom, mix, roles, _wanted_roles(op, wrt, ODCONV_NAMES, roles, call))
    return tuple(grads.get(role) for role in ("input", "cells", "attention", "sa", "ca", "fa"))


# --- warehouse_conv2d ---

def warehouse_conv2d(input, cells, attention, stride=1, padding=0, dilation=1, groups=1, kernel_shape=None):
    """KernelWarehouse-style conv: the kernel [Cout, Cin/groups, kh, kw] (kernel_shape,
    required) is tiled into S = (Cout/co)(Cin/groups/ci)(kh/ckh)(kw/ckw) slots, row-major
    over the four block indices; slot s of sample b is sum_j attention[b, s, j] * cells[j];
    y[b] = conv2d(input[b], that kernel, None, stride, padding, dilation, groups), fused.

    input [B, Cin, H, W], cells [n, co, ci, ckh, ckw], attention [B, S, n] -> [B, Cout, Ho, Wo]."""
    op = "warehouse_conv2d"
    call = Call(op, input=input, cells=cells, attention=attention)
    geom, mix = _warehouse_geometry(op, call, kernel_shape, stride, padding, dilation, groups)
    return call.export(_forward(call, geom, mix, "cells", "attention"))


def warehouse_conv2d_backward(grad_output, input, cells, attention, stride=1, padding=0, dilation=1, groups=1,
                              kernel_shape=None, wrt=None):
    """Gradients of warehouse_conv2d: (grad_input, grad_cells, grad_attention); None for an
    argument not in `wrt`."""
    op = "warehouse_conv2d_backward"
    call = Call(op, input=input, grad_output=grad_output, cells=cells, attention=attention)
    geom, mix = _warehouse_geometry(op, call, kernel_shape, stride, padding, dilation, groups)
    check_grad_output(op, call, geom.output_shape)
    roles = dict(input="input", cells="cells", attention="attention")
    grads = _gradients(call, geom, mix, roles, _wanted_roles(op, wrt, WAREHOUSE_NAMES, roles, call))
    return tuple(grads.get(role) for role in ("input", "cells", "attention"))


def _dynamic_output_shape(op, s, stride, padding, dilation, groups, algorithm):
    return _dynamic_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


def _odconv_output_shape(op, s, stride, padding, dilation, groups):
    return _odconv_geometry(op, s, stride, padding, dilation, groups)[0].output_shape


def _warehouse_output_shape(op, s, stride, padding, dilation, groups, kernel_shape):
    return _warehouse_geometry(op, s, kernel_shape, stride, padding, dilation, groups)[0].output_shape


register_op(OpDef(dynamic_conv2d, dynamic_conv2d_backward, arrays=DYNAMIC_NAMES, output_shape=_dynamic_output_shape,
                  examples=(Example(dict(input=(3, 4, 6, 5), weight=(3, 6, 2, 3, 3), attention=(3, 3), bias=(3, 6)),
                                    dict(padding=1, groups=2)),)))
register_op(OpDef(odconv2d, odconv2d_backward, arrays=ODCONV_NAMES, output_shape=_odconv_output_shape,
                  examples=(Example(dict(input=(2, 4, 6, 6), weight=(3, 6, 4, 3, 3), kernel_attention=(2, 3),
                                         spatial_attention=(2, 3, 3), channel_attention=(2, 4),
                                         filter_attention=(2, 6)), dict(stride=2, padding=1)),
                            Example(dict(input=(2, 4, 5, 6), weight=(2, 4, 2, 3, 2), kernel_attention=(2, 2),
                                         spatial_attention=None, channel_attention=(2, 4), filter_attention=None),
                                    dict(padding=(1, 0), groups=2)))))
register_op(OpDef(warehouse_conv2d, warehouse_conv2d_backward, arrays=WAREHOUSE_NAMES,
                  output_shape=_warehouse_output_shape,
                  examples=(Example(dict(input=(2, 4, 7, 6), cells=(3, 2, 2, 3, 1), attention=(2, 4, 3)),
                                    dict(padding=1, groups=2, kernel_shape=(4, 2, 3, 2))),)))
