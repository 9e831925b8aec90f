"""channel_shuffle: torch.nn.functional.channel_shuffle semantics (ShuffleNet), forward
and hand-written backward.

    channel_shuffle: [N, C, *] -> [N, C, *],  out[n, j*g + i, ...] = in[n, i*(C/g) + j, ...]

g = groups divides C; `*` is one spatial dim or more. As in torch, dim 1 is the channel
dim whatever the rank, so a 3-D input is [N, C, L] (not an unbatched [C, H, W]). The
channels, viewed as [g, C/g], are transposed to [C/g, g]; the gradient is the inverse
permutation, channel_shuffle with C/g groups, so results are bit-exact in every dtype.
Kernels: kernels_cu/channel_shuffle.cu (one thread per output element, a gather).
"""

from __future__ import annotations

import math

from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import Call, check_grad_output, parse_wrt, positive_int, threads_for

KERNELS = KernelModule(
    "channel_shuffle.cu",
    kernels=("channel_shuffle_fwd",),
    params_struct="ChannelShuffleParams",
)


def _geometry(op: str, shape, groups):
    """The kernel params of channel_shuffle(input of `shape`, groups) (the output has the
    input's shape); ValueError/TypeError naming the argument."""
    g = positive_int(op, "groups", groups)
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"{op}: input must have at least 3 dims [N, C, *] (dim 1 is the channel dim), "
                         f"got shape {shape}")
    batch, channels, *spatial = shape
    if channels % g:
        raise ValueError(f"{op}: input's channel dim ({channels}, at dim 1) must be divisible by groups={g}; "
                         f"got input shape {shape}")
    return dict(batch=batch, channels=channels, groups=g, inner=math.prod(spatial))


def _run(call: Call, params: dict, source: str):
    """The shuffled `source` (input's shape), one thread per element; no launch when empty."""
    shape = call.shape("input")
    out = call.empty(shape)
    n = math.prod(shape)
    if n:  # batch 0 or an empty dim: a correctly shaped empty result, nothing launched
        block = threads_for(n)  # 256 but for tiny tensors; the kernel grid-strides
        call.launch(KERNELS, "channel_shuffle_fwd", -(-n // block), block, params, call.operand(source), out)
    return out


def channel_shuffle(input, groups):
    """input [N, C, *] -> [N, C, *] with the channels, as [groups, C/groups], transposed
    to [C/groups, groups]: out[:, j*groups + i] = input[:, i*(C/groups) + j], as
    torch.nn.functional.channel_shuffle."""
    op = "channel_shuffle"
    call = Call(op, input=input)
    params = _geometry(op, call.shape("input"), groups)
    return call.export(_run(call, params, "input"))


def channel_shuffle_backward(grad_output, input, groups, wrt=None):
    """Gradient of channel_shuffle: (grad_input,) = (channel_shuffle(grad_output, C // groups),);
    (None,) when `wrt` excludes "input"."""
    op = "channel_shuffle_backward"
    call = Call(op, input=input, grad_output=grad_output)
    params = _geometry(op, call.shape("input"), groups)
    check_grad_output(op, call, call.shape("input"))
    if "input" not in parse_wrt(op, wrt, ("input",)):
        return (None,)
    # the inverse permutation: the [C/g, g] view transposed back is a shuffle with C/g groups
    inverse = dict(params, groups=params["channels"] // params["groups"])
    return (call.export(_run(call, inverse, "grad_output")),)


def _output_shape(op, s, groups):
    _geometry(op, s.shape("input"), groups)
    return tuple(s.shape("input"))


# Pure data movement: keeps its input's dtype under torch autocast, as torch's channel_shuffle.
register_op(OpDef(channel_shuffle, channel_shuffle_backward, arrays=("input",), output_shape=_output_shape,
                  autocast=False, examples=(Example(dict(input=(2, 6, 3, 5)), dict(groups=3)),
                                            Example(dict(input=(3, 8, 7)), dict(groups=2)))))
