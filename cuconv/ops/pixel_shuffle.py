"""pixel_shuffle / pixel_unshuffle: torch.nn.functional semantics, forward and
hand-written backward.

    pixel_shuffle:   [*, C*r*r, H, W] -> [*, C, H*r, W*r],  out[..., c, h*r+i, w*r+j] = in[..., c*r*r + i*r + j, h, w]
    pixel_unshuffle: [*, C, H*r, W*r] -> [*, C*r*r, H, W],  the inverse permutation

`*` is any number of leading dims (none for a 3-D input), flattened into one batch
dim for the kernels. Both are permutations, so each op's gradient is the other op
applied to grad_output, and the results are bit-exact in every dtype. Kernels:
kernels_cu/pixel_shuffle.cu (one thread per output element, a gather either way).
"""

from __future__ import annotations

import math

from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._common import Call, check_grad_output, parse_wrt, positive_int, threads_for

KERNELS = KernelModule(
    "pixel_shuffle.cu",
    kernels=("pixel_shuffle_fwd", "pixel_unshuffle_fwd"),
    params_struct="PixelShuffleParams",
)


def _shuffle_geometry(op: str, shape, factor, name: str):
    """(params, output shape) of pixel_shuffle on an input of `shape`."""
    r = positive_int(op, name, factor)
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"{op}: input must have at least 3 dims [*, C*{name}^2, H, W], got shape {shape}")
    *lead, channels, h, w = shape
    if channels % (r * r):
        raise ValueError(f"{op}: input's channel dim ({channels}, at dim -3) must be divisible by "
                         f"{name}^2 = {r * r}; got input shape {shape}, {name}={r}")
    c = channels // (r * r)
    params = dict(batch=math.prod(lead), channels=c, height=h, width=w, factor=r)
    return params, (*lead, c, h * r, w * r)


def _unshuffle_geometry(op: str, shape, factor, name: str):
    """(params, output shape) of pixel_unshuffle on an input of `shape`."""
    r = positive_int(op, name, factor)
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"{op}: input must have at least 3 dims [*, C, H*{name}, W*{name}], got shape {shape}")
    *lead, c, hr, wr = shape
    if hr % r or wr % r:
        raise ValueError(f"{op}: input's height ({hr}) and width ({wr}) must be divisible by {name}={r}; "
                         f"got input shape {shape}")
    params = dict(batch=math.prod(lead), channels=c, height=hr // r, width=wr // r, factor=r)
    return params, (*lead, c * r * r, hr // r, wr // r)


def _run(call: Call, kernel: str, params: dict, out_shape, source: str):
    """One output of `out_shape`, one thread per element; no launch when it is empty."""
    out = call.empty(out_shape)
    n = math.prod(out_shape)
    if n:  # batch 0 or an empty dim: a correctly shaped empty result, nothing launched
        block = threads_for(n)  # 256 but for tiny tensors; the kernel grid-strides
        call.launch(KERNELS, kernel, -(-n // block), block, params, call.operand(source), out)
    return out


def pixel_shuffle(input, upscale_factor):
    """input [*, C*r*r, H, W] -> [*, C, H*r, W*r] (r = upscale_factor), as
    torch.nn.functional.pixel_shuffle."""
    return _permute("pixel_shuffle", input, upscale_factor, "upscale_factor", _shuffle_geometry, "pixel_shuffle_fwd")


def pixel_unshuffle(input, downscale_factor):
    """input [*, C, H*r, W*r] -> [*, C*r*r, H, W] (r = downscale_factor), as
    torch.nn.functional.pixel_unshuffle."""
    return _permute("pixel_unshuffle", input, downscale_factor, "downscale_factor", _unshuffle_geometry,
                    "pixel_unshuffle_fwd")


def _permute(op: str, input, factor, name: str, geometry, kernel: str):
    call = Call(op, input=input)
    params, out_shape = geometry(op, call.shape("input"), factor, name)
    return call.export(_run(call, kernel, params, out_shape, "input"))


def pixel_shuffle_backward(grad_output, input, upscale_factor, wrt=None):
    """Gradient of pixel_shuffle: (grad_input,) = (pixel_unshuffle(grad_output, r),);
    (None,) when `wrt` excludes "input"."""
    return _inverse("pixel_shuffle_backward", grad_output, input, upscale_factor, "upscale_factor", _shuffle_geometry,
                    "pixel_unshuffle_fwd", wrt)


def pixel_unshuffle_backward(grad_output, input, downscale_factor, wrt=None):
    """Gradient of pixel_unshuffle: (grad_input,) = (pixel_shuffle(grad_output, r),);
    (None,) when `wrt` excludes "input"."""
    return _inverse("pixel_unshuffle_backward", grad_output, input, downscale_factor, "downscale_factor",
                    _unshuffle_geometry, "pixel_shuffle_fwd", wrt)


def _inverse(op: str, grad_output, input, factor, name: str, geometry, inverse_kernel: str, wrt):
    """(grad_input,) of a permutation: its inverse applied to grad_output. The inverse
    kernel maps the other way with the same params, so grad_input gets input's shape."""
    call = Call(op, input=input, grad_output=grad_output)
    params, out_shape = geometry(op, call.shape("input"), factor, name)
    check_grad_output(op, call, out_shape)
    if "input" not in parse_wrt(op, wrt, ("input",)):
        return (None,)
    return (call.export(_run(call, inverse_kernel, params, call.shape("input"), "grad_output")),)


def _shuffle_output_shape(op, s, upscale_factor):
    return tuple(_shuffle_geometry(op, s.shape("input"), upscale_factor, "upscale_factor")[1])


def _unshuffle_output_shape(op, s, downscale_factor):
    return tuple(_unshuffle_geometry(op, s.shape("input"), downscale_factor, "downscale_factor")[1])


# Pure data movement: keeps its input's dtype under torch autocast, as torch's pixel_shuffle.
register_op(OpDef(pixel_shuffle, pixel_shuffle_backward, arrays=("input",), output_shape=_shuffle_output_shape,
                  autocast=False, examples=(Example(dict(input=(2, 8, 3, 4)), dict(upscale_factor=2)),)))
register_op(OpDef(pixel_unshuffle, pixel_unshuffle_backward, arrays=("input",), output_shape=_unshuffle_output_shape,
                  autocast=False, examples=(Example(dict(input=(2, 2, 6, 4)), dict(downscale_factor=2)),)))
