"""cuconv for PyTorch: every op as a differentiable torch custom op, and nn layers.

    import cuconv.torch as ct
    y = ct.deform_conv2d(x, offset, weight, mask=mask)        # functions: cuconv's signatures
    layer = ct.DeformConv2d(64, 64, 3, padding=1)            # layers: torch.nn modules

Importing this module imports torch (`import cuconv` alone does not). docs/torch.md has
the details.

Functions. For each op `OP` of the registry (cuconv._registry.OPS) this module registers,
in the `cuconv` namespace of torch.library:

- `torch.ops.cuconv.OP`: the forward. Its schema is generated from the op's Python
  signature: the array arguments first (`Tensor`, or `Tensor?` where the default is
  None), then the parameters mapped to schema types (see `_PARAMS`).
- `torch.ops.cuconv.OP_backward(grad_output, <the forward's arguments>, bool[] wrt)
  -> Tensor[]`: the gradients of the arrays whose `wrt` entry is True, in order. It
  calls `cuconv.OP_backward(..., wrt=those names)`, so a gradient nobody needs is never
  computed.
- a fake (meta) implementation for each: the forward's shape comes from
  `cuconv._registry.output_shape` (the op's own geometry checks, on shapes alone), the
  backward's outputs have their arrays' shapes. torch.compile traces through both
  without running a kernel and without a graph break.
- the autograd formula (forward -> OP_backward) and, for the ops with weights, an
  autocast rule: under `torch.autocast(device, dtype)` floating-point arguments
  (float64 excepted, as autocast does) are cast to `dtype`, like torch's convolutions.

The public functions (`conv2d`, ...) have the signatures of the cuconv functions of the
same name and call these ops. Outputs are contiguous tensors allocated by torch on the
input's device (cuconv allocates through torch), kernels run on torch's current stream.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from cuconv import _registry

NAMESPACE = "cuconv"
OPS = tuple(_registry.OPS)


def _int_list(value) -> list[int]:
    """An int or a sequence of ints as a list; an int stays one element, which cuconv
    expands to every spatial dimension (its checks see the same value either way)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [operator.index(v) for v in value]  # cuconv checks the length
    return [operator.index(value)]


# Parameter name -> (schema declaration(s), to schema values, back to cuconv's value).
# padding becomes two schema arguments: the numbers and a mode ('same', 'valid' or '').
def _from_int_list(values):
    """A schema int[] back to cuconv's value: one element is the int itself."""
    return values[0] if len(values) == 1 else tuple(values)


_PARAMS = {
    "stride": ("int[] stride", lambda v: (_int_list(v),), _from_int_list),
    "dilation": ("int[] dilation", lambda v: (_int_list(v),), _from_int_list),
    "output_padding": ("int[] output_padding", lambda v: (_int_list(v),), _from_int_list),
    "padding": ("int[] padding, str padding_mode",
                lambda v: ([0], v) if isinstance(v, str) else (_int_list(v), ""),
                lambda s, mode: mode or _from_int_list(s)),
    "groups": ("int groups", lambda v: (operator.index(v),), int),
    "upscale_factor": ("int upscale_factor", lambda v: (operator.index(v),), int),
    "downscale_factor": ("int downscale_factor", lambda v: (operator.index(v),), int),
    "kernel_shape": ("int[]? kernel_shape", lambda v: (None if v is None else [operator.index(d) for d in v],),
                     lambda s: None if s is None else tuple(s)),
    "algorithm": ("str algorithm", lambda v: (str(v),), str),
    "kernel_size": ("int[] kernel_size", lambda v: (_int_list(v),), _from_int_list),
    "offset_scale": ("float offset_scale", lambda v: (float(v),), float),
    "remove_center": ("bool remove_center", lambda v: (bool(v),), bool),
}


class OpSpec:
    """One op's arrays and parameters, and the mapping between its Python arguments and
    the custom op's schema arguments."""

    def __init__(self, name: str):
        opdef = _registry.get_op(name)
        self.name = name
        self.function = opdef.forward
        self.backward_function = opdef.backward
        self.signature = opdef.signature
        self.arrays = opdef.arrays
        self.optional = opdef.optional
        self.params = opdef.params
        self.autocast = opdef.autocast
        self.nonlinear = opdef.nonlinear
        self.defaults = {p.name: p.default for p in self.signature.parameters.values()}
        self.positional = tuple(p.name for p in self.signature.parameters.values()
                                if p.kind == p.POSITIONAL_OR_KEYWORD)
        arrays = ", ".join(f"Tensor{'?' if a in self.optional else ''} {a}" for a in self.arrays)
        params = "".join(", " + _PARAMS[p][0] for p in self.params)
        self.schema = f"({arrays}{params}) -> Tensor"
        self.backward_schema = f"(Tensor grad_output, {arrays}{params}, bool[] wrt) -> Tensor[]"
        self.schema_length = len(self.arrays) + sum(_PARAMS[p][0].count(",") + 1 for p in self.params)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The Python call's arguments by name, defaults filled in (errors like Python's)."""
        if len(args) > len(self.positional):
            raise TypeError(f"{self.name}() takes {len(self.positional)} positional arguments, got {len(args)}")
        values = dict(zip(self.positional, args))
        for key, value in kwargs.items():
            if key not in self.defaults or key in values:
                raise TypeError(f"{self.name}() got an unexpected or repeated argument {key!r}")
            values[key] = value
        for key, default in self.defaults.items():
            if key not in values:
                if default is inspect.Parameter.empty:
                    raise TypeError(f"{self.name}() missing required argument {key!r}")
                values[key] = default
        return values

    def to_schema(self, values: dict) -> list:
        """Python arguments by name -> the custom op's positional arguments."""
        out = [values[a] for a in self.arrays]
        for p in self.params:
            out.extend(_PARAMS[p][1](values[p]))
        return out

    def from_schema(self, args) -> tuple[dict, dict]:
        """The custom op's positional arguments -> (arrays by name, cuconv parameters)."""
        arrays = dict(zip(self.arrays, args))
        params, at = {}, len(self.arrays)
        for p in self.params:
            width = _PARAMS[p][0].count(",") + 1
            params[p] = _PARAMS[p][2](*args[at:at + width])
            at += width
        return arrays, params


SPECS = {name: OpSpec(name) for name in OPS}
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901 (defines new ops)


def _fresh(result: torch.Tensor, arrays) -> torch.Tensor:
    """A contiguous result that shares no memory with the op's arguments (a custom op's
    output may not alias its inputs)."""
    result = result.contiguous()
    storage = result.untyped_storage().data_ptr()
    if result.numel() and any(isinstance(a, torch.Tensor) and a.numel() and a.untyped_storage().data_ptr() == storage
                              for a in arrays):
        result = result.clone()
    return result


def _shape_of(arrays: dict) -> dict:
    return {n: None if a is None else tuple(a.shape) for n, a in arrays.items()}


def _register(spec: OpSpec) -> None:
    name, qualified = spec.name, f"{NAMESPACE}::{spec.name}"
    _LIB.define(spec.name + spec.schema)
    _LIB.define(spec.name + "_backward" + spec.backward_schema)

    def forward(*args):
        arrays, params = spec.from_schema(args)
        return _fresh(spec.function(**arrays, **params), arrays.values())

    def forward_fake(*args):
        arrays, params = spec.from_schema(args)
        return arrays["input"].new_empty(_registry.output_shape(name, _shape_of(arrays), **params))

    def backward(grad_output, *args):
        *args, mask = args
        arrays, params = spec.from_schema(args)
        wrt = tuple(a for a, wanted in zip(spec.arrays, mask) if wanted)
        grads = spec.backward_function(grad_output, **arrays, **params, wrt=wrt)
        return [_fresh(g, arrays.values()) for g, wanted in zip(grads, mask) if wanted]

    def backward_fake(grad_output, *args):
        *args, mask = args
        arrays, _ = spec.from_schema(args)
        return [arrays[a].new_empty(arrays[a].shape) for a, wanted in zip(spec.arrays, mask) if wanted]

    torch.library.impl(qualified, "default", forward, lib=_LIB)
    torch.library.impl(qualified + "_backward", "default", backward, lib=_LIB)
    torch.library.register_fake(qualified, forward_fake, lib=_LIB)
    torch.library.register_fake(qualified + "_backward", backward_fake, lib=_LIB)

    count = len(spec.arrays)
    backward_op = getattr(torch.ops.cuconv, name + "_backward").default

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:count])
        ctx.params = inputs[count:]

    def autograd_backward(ctx, grad_output):
        arrays = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[i]) and arrays[i] is not None for i in range(count)]
        grads = iter(backward_op(grad_output, *arrays, *ctx.params, mask) if any(mask) else ())
        return (*(next(grads) if wanted else None for wanted in mask), *(None,) * len(ctx.params))

    torch.library.register_autograd(qualified, autograd_backward, setup_context=setup_context, lib=_LIB)
    _register_higher_order(spec, getattr(torch.ops.cuconv, name).default, backward_op)
    if spec.autocast:
        for device_type in ("cpu", "cuda"):
            _register_autocast(getattr(torch.ops.cuconv, name).default, device_type)


def _substitute(arrays, i: int, value) -> list:
    """The op's arrays with the i-th replaced by `value`."""
    return [value if j == i else a for j, a in enumerate(arrays)]


class HigherOrderGradientError(NotImplementedError):
    """A higher-order derivative cuconv does not compute (through deform_conv2d's offset)."""


def _register_higher_order(spec: OpSpec, forward_op, backward_op) -> None:
    """Autograd of OP_backward, so double backward (and any higher order) is right.

    OP is affine in each array argument a_i (but those of spec.nonlinear): OP(a) with a_i
    replaced by t is OP(a_{i<-0}) plus a linear function of t. So, for the first-order
    gradients G_i = OP_backward(gy, a)_i and their cotangents v_i,
        d/d gy  sum_i <v_i, G_i> = sum_i OP(a_{i<-v_i}) - OP(a_{i<-0})
        d/d a_j sum_i <v_i, G_i> = sum_{i != j} OP_backward(gy, a_{i<-v_i})_j - OP_backward(gy, a_{i<-0})_j
    (<,> is the real inner product, torch's convention for complex arrays). The terms are
    the differentiable custom ops themselves, so the next order follows the same way."""
    count = len(spec.arrays)
    nonlinear = [spec.arrays.index(a) for a in spec.nonlinear]

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an unused first-order gradient arrives as None
        ctx.save_for_backward(*inputs[:1 + count])
        ctx.params = inputs[1 + count:-1]
        ctx.mask = list(inputs[-1])

    def backward(ctx, grads):
        grad_output, *arrays = ctx.saved_tensors
        wanted = iter(grads)
        cotangents = {i: g for i, (on, g) in enumerate((on, next(wanted) if on else None) for on in ctx.mask)
                      if g is not None}
        need = [bool(ctx.needs_input_grad[1 + j]) and arrays[j] is not None for j in range(count)]
        for k in nonlinear:
            if cotangents and (k in cotangents or need[k]):
                raise HigherOrderGradientError(
                    f"{spec.name}: higher-order gradients through {spec.arrays[k]} are not supported ({spec.name} "
                    f"is not affine in {spec.arrays[k]}); detach {spec.arrays[k]} for a double backward through "
                    f"the other arguments")
        grad_gy, grad_arrays = None, [None] * count
        for i, v in cotangents.items():
            with_v, with_zero = _substitute(arrays, i, v), _substitute(arrays, i, torch.zeros_like(arrays[i]))
            if ctx.needs_input_grad[0]:
                term = forward_op(*with_v, *ctx.params) - forward_op(*with_zero, *ctx.params)
                grad_gy = term if grad_gy is None else grad_gy + term
            mask = [need[j] and j != i for j in range(count)]
            if any(mask):
                plus = backward_op(grad_output, *with_v, *ctx.params, mask)
                minus = backward_op(grad_output, *with_zero, *ctx.params, mask)
                for j, p, m in zip((j for j in range(count) if mask[j]), plus, minus):
                    grad_arrays[j] = p - m if grad_arrays[j] is None else grad_arrays[j] + (p - m)
        return (grad_gy, *grad_arrays, *(None,) * len(ctx.params), None)

    torch.library.register_autograd(f"{NAMESPACE}::{spec.name}_backward", backward, setup_context=setup_context,
                                    lib=_LIB)


def _register_autocast(op, device_type: str) -> None:
    """Under torch.autocast(device_type, dtype): floating-point arguments on that device
    (not float64) are cast to the autocast dtype of the moment, then the op runs with
    autocast excluded. torch.library.register_autocast does the same with a dtype fixed
    at registration; this reads it at call time, so float16 and bfloat16 both work."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device_type:
            return value.to(torch.get_autocast_dtype(device_type))
        return value

    @op.py_impl(key)
    def autocast(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*map(cast, args))

    _LIB.impl(op._schema.name.split("::")[1], lambda keyset, *args: autocast(*args),
              "Autocast" + torch._C._dispatch_key_for_device(device_type), with_keyset=True)


def _public(spec: OpSpec):
    op = getattr(torch.ops.cuconv, spec.name).default

    def function(*args, **kwargs):
        return op(*spec.to_schema(spec.bind(args, kwargs)))

    function.__name__ = function.__qualname__ = spec.name
    function.__module__ = __name__
    function.__signature__ = spec.signature
    function.__doc__ = (f"cuconv.{spec.name} as a differentiable torch op (torch.ops.cuconv.{spec.name}): "
                        f"same arguments and semantics, autograd through cuconv.{spec.name}_backward.")
    return function


for _spec in SPECS.values():
    _register(_spec)

for _name, _spec in SPECS.items():
    globals()[_name] = _public(_spec)


# ---------------------------------------------------------------------------------------
# Layers: each owns its parameters, initialises them like its torch / torchvision /
# reference-implementation counterpart, and carries the kernel or attention generator its
# paper uses (docs/torch.md cites each).

def _size2(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _init_like_conv(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """nn.Conv2d.reset_parameters for a [Cout, Cin/g, kh, kw] weight (or a stack of them:
    every leading [K] entry is initialised on its own, as K independent convolutions)."""
    if weight.dim() == 5:
        for k in range(weight.shape[0]):
            _init_like_conv(weight[k], None if bias is None else bias[k])
        return
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0].numel()) if weight[0].numel() else 0
        nn.init.uniform_(bias, -bound, bound)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d (same arguments, parameters, initialisation and state_dict) computed
    by cuconv.conv2d. A padding_mode other than 'zeros' pads with F.pad first, as torch does."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d (same arguments, parameters and initialisation, forward's
    output_size too) computed by cuconv.conv_transpose2d. padding_mode must be 'zeros'."""

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("ConvTranspose2d: only padding_mode='zeros' is supported (as in torch)")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                   self.groups, self.dilation)


class DepthwiseSeparableConv2d(nn.Module):
    """MobileNet / Xception depthwise-separable convolution, one fused cuconv kernel:
    a depthwise k x k conv (depth multiplier m) then a 1x1 pointwise conv. Parameters and
    initialisation are those of nn.Conv2d(C, C*m, k, groups=C) followed by
    nn.Conv2d(C*m, Cout, 1)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, depth_multiplier=1,
                 bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        mid = in_channels * depth_multiplier
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.depthwise_weight = nn.Parameter(torch.empty(mid, 1, *_size2(kernel_size), **kw))
        self.pointwise_weight = nn.Parameter(torch.empty(out_channels, mid, 1, 1, **kw))
        self.depthwise_bias = nn.Parameter(torch.empty(mid, **kw)) if bias else None
        self.pointwise_bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        _init_like_conv(self.depthwise_weight, self.depthwise_bias)
        _init_like_conv(self.pointwise_weight, self.pointwise_bias)

    def forward(self, x):
        return depthwise_separable_conv2d(x, self.depthwise_weight, self.pointwise_weight, self.depthwise_bias,
                                             self.pointwise_bias, self.stride, self.padding, self.dilation)


class DeformConv2d(nn.Module):
    """Deformable convolution with its offset (and mask) predictor.

    modulated=True is DCNv2 (Zhu et al., CVPR 2019): a conv2d with this layer's kernel
    size, stride, padding and dilation predicts 3*Go*kh*kw channels per output pixel,
    the first 2*Go*kh*kw are the offsets (torchvision's (dy, dx) layout), the last
    Go*kh*kw pass through a sigmoid and are the mask. modulated=False is DCNv1 (Dai et
    al., ICCV 2017): 2*Go*kh*kw offset channels, no mask. The predictor is zero
    initialised (offsets 0, mask 0.5 at the start, as in mmcv's ModulatedDeformConv2dPack);
    weight and bias are initialised like torchvision.ops.DeformConv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 offset_groups=1, modulated=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: in_channels {in_channels} and out_channels {out_channels} must be "
                             f"divisible by groups {groups}")
        self.kernel_size = _size2(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.offset_groups, self.modulated = offset_groups, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        taps = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.offset_predictor = Conv2d(in_channels, (3 if modulated else 2) * taps, self.kernel_size, stride,
                                       padding, dilation, bias=True, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        _init_like_conv(self.weight, self.bias)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def forward(self, x):
        predicted = self.offset_predictor(x)
        taps = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset = predicted[:, :2 * taps]
        mask = torch.sigmoid(predicted[:, 2 * taps:]) if self.modulated else None
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                mask=mask)


class _ToChannelsLast(nn.Module):
    """[N, C, H, W] -> [N, H, W, C] (a view), the parameterless step of the official
    modules' norm blocks (kept so the state_dict indices are the official ones)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def _dcn_norm(channels: int, norm_layer: str, **kw) -> nn.Sequential:
    """InternImage's norm block from channels-first to channels-last: 'LN' is
    (to channels-last, LayerNorm(eps=1e-6)), 'BN' is (BatchNorm2d, to channels-last)."""
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6, **kw))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels, **kw), _ToChannelsLast())
    raise ValueError(f"DCNv3: norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


_DCN_ACTIVATIONS = {"ReLU": nn.ReLU, "SiLU": nn.SiLU, "GELU": nn.GELU}


def _dcn_geometry(name: str, channels: int, kernel_size: int, stride: int, pad: int, dilation: int, group: int,
                  remove_center: bool) -> int:
    """The official modules' checks plus cuconv's: channels divisible by group, an odd kernel
    with remove_center, and an output the size of the input (the offsets are predicted per
    input pixel). Returns K, the taps per group."""
    if channels % group:
        raise ValueError(f"{name}: channels {channels} must be divisible by group {group}")
    if remove_center and kernel_size % 2 == 0:
        raise ValueError(f"{name}: remove_center needs an odd kernel_size, got {kernel_size}")
    if stride == 1 and 2 * pad != dilation * (kernel_size - 1):
        raise ValueError(f"{name}: the output must be the input's size (offsets are predicted per input pixel), "
                         f"which at stride 1 needs 2*pad == dilation*(kernel_size-1); got kernel_size {kernel_size}, "
                         f"pad {pad}, dilation {dilation}")
    return kernel_size * kernel_size - int(remove_center)


def _dcn_check_size(name: str, h: int, w: int, kernel_size: int, stride: int, pad: int, dilation: int) -> None:
    out = [(size + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1 for size in (h, w)]
    if out != [h, w]:
        raise ValueError(f"{name}: input {h}x{w} would give a {out[0]}x{out[1]} output (kernel_size {kernel_size}, "
                         f"stride {stride}, pad {pad}, dilation {dilation}); the offsets are predicted per input "
                         f"pixel, so the output must be the input's size")


def _center_feature_scale(query, weight, bias, x, x_proj, channels_per_group):
    """InternImage's centre-feature scale: s = sigmoid(query W^T + b) per group, broadcast over
    the group's channels; the result mixes the aggregation and the projected input,
    x (1 - s) + x_proj s."""
    scale = torch.sigmoid(F.linear(query, weight, bias)).repeat_interleave(channels_per_group, dim=-1)
    return x * (1 - scale) + x_proj * scale


class DCNv3(nn.Module):
    """InternImage's DCNv3 module (Wang et al., CVPR 2023; OpenGVLab/InternImage
    ops_dcnv3/modules/dcnv3.py): same constructor arguments, parameter names and
    initialisation, so an official state_dict loads with strict=True; the aggregation is
    cuconv.dcnv3 (docs/dcn.md).

    forward(input [N, H, W, C]) -> [N, H, W, C]:
        x = input_proj(input)
        q = act(norm(dw_conv(input)))               depthwise dw_kernel_size conv, channels-last out
        offset = offset(q); mask = softmax per group of mask(q)
        y = dcnv3(x, offset, mask, kernel_size, stride, pad, dilation, group, offset_scale, remove_center)
        y = y (1 - s) + x s,  s = sigmoid(q W_cfs^T + b_cfs) per group   (center_feature_scale only)
        return output_proj(y)
    The offset and mask linears start at zero, input_proj / output_proj are Xavier uniform
    with zero bias, as the official module. The output must be the input's size (offsets are
    predicted per input pixel): otherwise ValueError, at construction for stride 1, else
    at the call."""

    def __init__(self, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1, dilation=1, group=4,
                 offset_scale=1.0, act_layer="GELU", norm_layer="LN", center_feature_scale=False, remove_center=False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        taps = _dcn_geometry("DCNv3", channels, kernel_size, stride, pad, dilation, group, remove_center)
        if act_layer not in _DCN_ACTIVATIONS:
            raise ValueError(f"DCNv3: act_layer must be one of {sorted(_DCN_ACTIVATIONS)}, got {act_layer!r}")
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation, self.group = stride, pad, dilation, group
        self.group_channels, self.offset_scale = channels // group, offset_scale
        self.center_feature_scale, self.remove_center = center_feature_scale, int(remove_center)
        self.dw_conv = nn.Sequential(
            Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels, **kw),
            _dcn_norm(channels, norm_layer, **kw), _DCN_ACTIVATIONS[act_layer]())
        self.offset = nn.Linear(channels, group * taps * 2, **kw)
        self.mask = nn.Linear(channels, group * taps, **kw)
        self.input_proj = nn.Linear(channels, channels, **kw)
        self.output_proj = nn.Linear(channels, channels, **kw)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **kw))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **kw))
        self._reset_parameters()

    def _reset_parameters(self):
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, input):
        n, h, w, _ = input.shape
        _dcn_check_size("DCNv3", h, w, self.kernel_size, self.stride, self.pad, self.dilation)
        x = self.input_proj(input)
        query = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(query)
        mask = torch.softmax(self.mask(query).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
        y = dcnv3(x, offset, mask.to(x.dtype), self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                  self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            y = _center_feature_scale(query, self.center_feature_scale_proj_weight,
                                      self.center_feature_scale_proj_bias, y, x, self.group_channels)
        return self.output_proj(y)


class DCNv4(nn.Module):
    """FlashInternImage's DCNv4 module (Xiong et al., CVPR 2024; OpenGVLab/DCNv4
    DCNv4_op/DCNv4/modules/dcnv4.py): same constructor arguments, parameter names and
    initialisation, so an official state_dict loads with strict=True; the aggregation is
    cuconv.dcnv4 (docs/dcn.md). The official module's group_channels % 16 == 0 and 3x3-only
    limits are not copied.

    forward(input [N, L, C], shape=(H, W)) -> [N, L, C]  (shape None: H = W = sqrt(L)):
        x = value_proj(input)                                    (skipped if without_pointwise)
        offset_mask = offset_mask(offset_mask_dw(input) if dw_kernel_size else input)   P channels,
                      P = ceil(3 G K / 8) * 8, the mask not normalised
        y = dcnv4(x, offset_mask, kernel_size, stride, pad, dilation, group, offset_scale, remove_center)
        y = y (1 - s) + x s,  s = sigmoid(y W_cfs^T + b_cfs)     (center_feature_scale only; the
                                                                  official module takes s from y)
        return output_proj(y)                                    (skipped if without_pointwise)
    offset_mask starts at zero, value_proj / output_proj are Xavier uniform with zero bias
    (output_proj has no bias with output_bias=False). The output must be the input's size:
    otherwise ValueError, at construction for stride 1, else at the call."""

    def __init__(self, channels=64, kernel_size=3, stride=1, pad=1, dilation=1, group=4, offset_scale=1.0,
                 dw_kernel_size=None, center_feature_scale=False, remove_center=False, output_bias=True,
                 without_pointwise=False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        taps = _dcn_geometry("DCNv4", channels, kernel_size, stride, pad, dilation, group, remove_center)
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation, self.group = stride, pad, dilation, group
        self.group_channels, self.offset_scale = channels // group, offset_scale
        self.center_feature_scale, self.remove_center = center_feature_scale, int(remove_center)
        self.without_pointwise = without_pointwise
        self.K = group * taps
        if dw_kernel_size is not None:
            self.offset_mask_dw = Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                                         groups=channels, **kw)
        self.offset_mask = nn.Linear(channels, math.ceil(3 * self.K / 8) * 8, **kw)
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels, **kw)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias, **kw)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **kw))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **kw))
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            for linear in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def forward(self, input, shape=None):
        n, length, c = input.shape
        if shape is None:
            h = w = math.isqrt(length)
            if h * w != length:
                raise ValueError(f"DCNv4: input has L = {length} positions, not a square; pass shape=(H, W)")
        else:
            h, w = shape
            if h * w != length:
                raise ValueError(f"DCNv4: shape {tuple(shape)} does not match the input's L = {length}")
        _dcn_check_size("DCNv4", h, w, self.kernel_size, self.stride, self.pad, self.dilation)
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, -1)
        query = input
        if self.dw_kernel_size is not None:
            query = self.offset_mask_dw(input.reshape(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        offset_mask = self.offset_mask(query).reshape(n, h, w, -1)
        y = dcnv4(x, offset_mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                  self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            y = _center_feature_scale(y, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias,
                                      y, x, self.group_channels)
        y = y.reshape(n, length, -1)
        return y if self.without_pointwise else self.output_proj(y)


class Involution2d(nn.Module):
    """Involution (Li et al., CVPR 2021) with RedNet's kernel generator (d-li14/involution):
    an average pool of the stride (ceil mode, so its size is the output's for any input
    size), a 1x1 conv reducing C to C/reduction_ratio + BatchNorm + ReLU, a 1x1 conv
    spanning to G*k*k channels (G = C / group_channels), reshaped into the per-pixel
    kernel [B, G, k, k, Ho, Wo]. Padding keeps the size at stride 1: dilation*(k-1)/2.
    Initialisation as mmcv's ConvModule: kaiming normal (fan_out, relu), zero biases,
    BatchNorm weight 1 and bias 0."""

    def __init__(self, channels, kernel_size, stride=1, dilation=1, group_channels=16, reduction_ratio=4,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if kernel_size % 2 == 0 or channels % group_channels:
            raise ValueError(f"Involution2d: kernel_size must be odd (got {kernel_size}) and channels {channels} "
                             f"divisible by group_channels {group_channels}")
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.groups = channels // group_channels
        self.padding = dilation * (kernel_size - 1) // 2
        hidden = max(channels // reduction_ratio, 1)
        self.reduce = Conv2d(channels, hidden, 1, bias=False, **kw)
        self.norm = nn.BatchNorm2d(hidden, **kw)
        self.span = Conv2d(hidden, kernel_size * kernel_size * self.groups, 1, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        for conv in (self.reduce, self.span):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.norm.reset_parameters()

    def kernel(self, x):
        """The generated kernel [B, G, k, k, Ho, Wo]."""
        pooled = x if self.stride == 1 else F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        k = self.span(F.relu(self.norm(self.reduce(pooled))))
        return k.view(k.shape[0], self.groups, self.kernel_size, self.kernel_size, k.shape[2], k.shape[3])

    def forward(self, x):
        return involution2d(x, self.kernel(x), self.stride, self.padding, self.dilation)


class DynamicConv2d(nn.Module):
    """Dynamic convolution (DY-CNN, Chen et al., CVPR 2020; CondConv, Yang et al., NeurIPS
    2019): K expert kernels mixed per sample by attention = softmax(fc2(relu(fc1(avgpool(x))))
    / temperature), hidden width C/reduction. `temperature` is a plain attribute: DY-CNN
    starts at 30 and anneals it to 1 over the first epochs. Experts and their biases are
    initialised like K nn.Conv2d layers."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 num_experts=4, reduction=4, temperature=30.0, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *_size2(kernel_size),
                                               **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **kw)) if bias else None
        hidden = max(in_channels // reduction, 1)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False, **kw)
        self.fc2 = nn.Linear(hidden, num_experts, **kw)
        _init_like_conv(self.weight, self.bias)

    def attention(self, x):
        """[B, K], rows summing to 1."""
        return torch.softmax(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))) / self.temperature, dim=1)

    def forward(self, x):
        return dynamic_conv2d(x, self.weight, self.attention(x), self.bias, self.stride, self.padding,
                                 self.dilation, self.groups)


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution (Li, Zhou and Yao, ICLR 2022; OSVT/ODConv).
    A shared trunk avgpool -> fc (C -> max(C*reduction, min_channel), no bias) -> BatchNorm
    -> ReLU feeds four heads, each divided by `temperature`: channel (sigmoid, [B, Cin]),
    filter (sigmoid, [B, Cout]; skipped for a depthwise conv), spatial (sigmoid,
    [B, kh, kw]; skipped for 1x1) and kernel (softmax over the K kernels; skipped for K=1).
    No bias. Initialisation as the reference: the K kernels and the heads kaiming normal
    (fan_out, relu), head biases 0, BatchNorm 1 / 0."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 kernel_num=4, reduction=0.0625, min_channel=16, temperature=1.0, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        kh, kwid = _size2(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel_size, self.temperature = (kh, kwid), float(temperature)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels // groups, kh, kwid, **kw))
        hidden = max(int(in_channels * reduction), min_channel)
        self.fc = nn.Linear(in_channels, hidden, bias=False, **kw)
        self.norm = nn.BatchNorm1d(hidden, **kw)
        self.channel_fc = nn.Linear(hidden, in_channels, **kw)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Linear(hidden, out_channels, **kw)
        self.spatial_fc = None if kh * kwid == 1 else nn.Linear(hidden, kh * kwid, **kw)
        self.kernel_fc = None if kernel_num == 1 else nn.Linear(hidden, kernel_num, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        for k in range(self.weight.shape[0]):
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")
        for fc in (self.fc, self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)
        self.norm.reset_parameters()

    def attentions(self, x):
        """(kernel [B, K], spatial [B, kh, kw] or None, channel [B, Cin], filter [B, Cout] or None)."""
        h = F.relu(self.norm(self.fc(x.mean(dim=(2, 3)))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(h) / t)
        filt = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(h) / t)
        spatial = None if self.spatial_fc is None else \
            torch.sigmoid(self.spatial_fc(h) / t).view(-1, *self.kernel_size)
        kernel = h.new_ones(h.shape[0], 1) if self.kernel_fc is None else torch.softmax(self.kernel_fc(h) / t, dim=1)
        return kernel, spatial, channel, filt

    def forward(self, x):
        kernel, spatial, channel, filt = self.attentions(x)
        return odconv2d(x, self.weight, kernel, spatial, channel, filt, self.stride, self.padding, self.dilation,
                           self.groups)


class PixelShuffle(nn.PixelShuffle):
    """torch.nn.PixelShuffle (same argument and repr) on cuconv.pixel_shuffle."""

    def forward(self, x):
        return pixel_shuffle(x, self.upscale_factor)


class PixelUnshuffle(nn.PixelUnshuffle):
    """torch.nn.PixelUnshuffle (same argument and repr) on cuconv.pixel_unshuffle."""

    def forward(self, x):
        return pixel_unshuffle(x, self.downscale_factor)


class SubPixelConv2d(nn.Module):
    """ESPCN's efficient sub-pixel convolution (Shi et al., CVPR 2016): a conv2d to
    out_channels*r*r channels and a pixel shuffle by r, one fused cuconv kernel. Initialised
    like that nn.Conv2d, or with icnr=True by ICNR (Aitken et al., 2017: the r*r sub-kernels
    of an output channel start equal, which removes the initial checkerboard)."""

    def __init__(self, in_channels, out_channels, kernel_size, upscale_factor=2, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, icnr=False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        r = self.upscale_factor = upscale_factor
        self.stride, self.padding, self.dilation, self.groups, self.icnr = stride, padding, dilation, groups, icnr
        self.weight = nn.Parameter(torch.empty(out_channels * r * r, in_channels // groups, *_size2(kernel_size), **kw))
        self.bias = nn.Parameter(torch.empty(out_channels * r * r, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        _init_like_conv(self.weight, self.bias)
        if self.icnr:
            r2 = self.upscale_factor ** 2
            with torch.no_grad():
                self.weight.copy_(self.weight[::r2].repeat_interleave(r2, dim=0))
                if self.bias is not None:
                    self.bias.copy_(self.bias[::r2].repeat_interleave(r2, dim=0))

    def forward(self, x):
        return subpixel_conv2d(x, self.weight, self.bias, self.upscale_factor, self.stride, self.padding,
                                  self.dilation, self.groups)


class AdaptiveFrequencyFilter(nn.Module):
    """AFFNet's adaptive frequency filter (Huang et al., 2023; docs/aff_block.md), the token
    mixer y = spectral_filter2d(x, mask) + x, with the mask computed from the spectrum:
    X = rfft2(x, ortho); a complex block-diagonal MLP (num_blocks diagonal blocks, hidden
    width channels*hidden_size_factor, ReLU on the real and imaginary parts) whose two
    layers are cuconv 1x1 group convolutions; soft-shrink by sparsity_threshold. Parameters
    are AFNO's layout and initialisation (0.02 * randn): w1 [2, K, C/K, C/K*f], b1
    [2, K, C/K*f], w2 [2, K, C/K*f, C/K], b2 [2, K, C/K] (index 0 real, 1 imaginary).
    The mask is computed in float32 (float64 for float64 input) with autocast off, as AFFNet
    does; the filter itself takes float16/bfloat16 input with that complex64 mask."""

    def __init__(self, channels, num_blocks=8, hidden_size_factor=1, sparsity_threshold=0.01, device=None,
                 dtype=None):
        super().__init__()
        if channels % num_blocks:
            raise ValueError(f"AdaptiveFrequencyFilter: channels {channels} not divisible by num_blocks {num_blocks}")
        kw = {"device": device, "dtype": dtype}
        self.num_blocks, self.sparsity_threshold = num_blocks, sparsity_threshold
        size, hidden = channels // num_blocks, channels // num_blocks * hidden_size_factor
        self.w1 = nn.Parameter(torch.empty(2, num_blocks, size, hidden, **kw))
        self.b1 = nn.Parameter(torch.empty(2, num_blocks, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(2, num_blocks, hidden, size, **kw))
        self.b2 = nn.Parameter(torch.empty(2, num_blocks, size, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        for p in (self.w1, self.b1, self.w2, self.b2):
            nn.init.normal_(p, std=0.02)

    def _complex_linear(self, zr, zi, w, b):
        """(Wr + i Wi)(zr + i zi) + (br + i bi), block-diagonal: four 1x1 group convs."""
        to_conv = lambda m: m.transpose(1, 2).reshape(-1, m.shape[1], 1, 1).to(zr.dtype)  # noqa: E731 [K*o, i, 1, 1]
        wr, wi = to_conv(w[0]), to_conv(w[1])
        br, bi = b[0].reshape(-1).to(zr.dtype), b[1].reshape(-1).to(zr.dtype)
        k = self.num_blocks
        re = conv2d(zr, wr, br, groups=k) - conv2d(zi, wi, None, groups=k)
        im = conv2d(zi, wr, bi, groups=k) + conv2d(zr, wi, None, groups=k)
        return re, im

    def mask(self, x):
        """The complex filter [B, C, H, W//2+1]."""
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(x.to(real), norm="ortho")
            ar, ai = self._complex_linear(spectrum.real, spectrum.imag, self.w1, self.b1)
            mr, mi = self._complex_linear(F.relu(ar), F.relu(ai), self.w2, self.b2)
            lam = self.sparsity_threshold
            return torch.complex(F.softshrink(mr, lam), F.softshrink(mi, lam))

    def forward(self, x):
        return spectral_filter2d(x, self.mask(x)) + x


LAYERS = ["Conv2d", "ConvTranspose2d", "DepthwiseSeparableConv2d", "DeformConv2d", "DCNv3", "DCNv4", "Involution2d",
          "DynamicConv2d", "ODConv2d", "PixelShuffle", "PixelUnshuffle", "SubPixelConv2d", "AdaptiveFrequencyFilter"]

__all__ = [*OPS, *LAYERS]
