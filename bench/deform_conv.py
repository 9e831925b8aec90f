"""deform_conv suite: the self-check of deform_conv2d (forward and every gradient)
against cuconv.reference, and DCNv1/DCNv2 layers timed against
torchvision.ops.deform_conv2d (when importable on the GPU) and a plain torch conv2d of
the same shape (the cost of the deformation)."""

from __future__ import annotations

from cuconv.ops.deform_conv import deform_conv2d, deform_conv2d_backward
from cuconv.reference import deform_conv as reference

from .harness import FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes, timed_layers

NAME = "deform_conv"
OPS = ("deform_conv2d",)  # the public ops it checks and times


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def torch_deform_conv2d(F, x, offset, weight, bias=None, mask=None, stride=1, padding=0, dilation=1):
    """An independent torch implementation of torchvision's semantics (the self-check's
    fp16/bf16 anchor and the tests' oracle, computed entirely in the tensors' dtype, with
    autograd): every tap samples the input with F.grid_sample (zeros padding: corners
    outside the image count 0, and nothing is sampled unless -1 < y < H, -1 < x < W),
    align_corners=False with pixel (y, x) normalised to ((2x+1)/W - 1, (2y+1)/H - 1) so
    that it lands exactly on the sampling position."""
    import torch

    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    taps, (ho, wo) = kh * kw, offset.shape[2:]
    go, gw = offset.shape[1] // (2 * taps), cin // cin_g
    off = offset.reshape(b, go, taps, 2, ho, wo)
    oy = (torch.arange(ho, dtype=x.dtype, device=x.device) * sh - ph)[:, None]
    ox = (torch.arange(wo, dtype=x.dtype, device=x.device) * sw - pw)[None, :]
    xg = x.reshape(b * go, cin // go, h, w)
    cols = []
    for t in range(taps):
        i, j = divmod(t, kw)
        y_pos = oy + i * dh + off[:, :, t, 0]  # [B, Go, Ho, Wo]
        x_pos = ox + j * dw + off[:, :, t, 1]
        grid = torch.stack(((2 * x_pos + 1) / w - 1, (2 * y_pos + 1) / h - 1), -1).reshape(b * go, ho, wo, 2)
        s = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        s = s.reshape(b, go, cin // go, ho, wo)
        if mask is not None:
            s = s * mask.reshape(b, go, taps, ho, wo)[:, :, t, None]
        cols.append(s.reshape(b, cin, ho, wo))
    cols = torch.stack(cols, 2).reshape(b, gw, cin_g * taps, ho, wo)
    y = torch.einsum("bgkhw,gok->bgohw", cols, weight.reshape(gw, cout // gw, cin_g * taps)).reshape(b, cout, ho, wo)
    return y if bias is None else y + bias[None, :, None, None]


# --- self-check: small odd shapes that cover every parameter ---

def positional(forward):
    """forward with mask as its fifth positional argument: the shared checks pass every
    array positionally, in the forward's order (input, offset, weight, bias, mask);
    deform_conv2d takes mask by keyword after its parameters."""
    return lambda x, offset, weight, bias, mask, **params: forward(x, offset, weight, bias, mask=mask, **params)


def positional_backward(backward):
    return lambda gy, x, offset, weight, bias, mask, **params: backward(gy, x, offset, weight, bias, mask=mask,
                                                                        **params)


def _shapes(x_shape, cout, k, weight_groups, offset_groups, out_hw, with_bias, with_mask):
    b, cin = x_shape[:2]
    taps = k[0] * k[1]
    return (x_shape, (b, 2 * offset_groups * taps, *out_hw), (cout, cin // weight_groups, *k),
            (cout,) if with_bias else None, (b, offset_groups * taps, *out_hw) if with_mask else None)


# (label, (input, offset, weight, bias, mask) shapes, params)
CHECK = [
    ("3x3 p1 v2 bias", _shapes((2, 4, 9, 8), 5, (3, 3), 1, 1, (9, 8), True, True), dict(padding=1)),
    ("3x3 s2 p1 v1 Gw2 Go2", _shapes((2, 6, 9, 10), 4, (3, 3), 2, 2, (5, 5), False, False), dict(stride=2, padding=1)),
    ("3x2 d(2,1) Go=Cin v2", _shapes((1, 3, 8, 7), 6, (3, 2), 1, 3, (4, 6), True, True), dict(dilation=(2, 1))),
]

DEFORM = OpCheck("deform_conv2d", positional(deform_conv2d), positional_backward(deform_conv2d_backward),
                 positional(reference.deform_conv2d), positional_backward(reference.deform_conv2d_backward),
                 torch_deform_conv2d, ("input", "offset", "weight", "bias", "mask"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return self_check_op(DEFORM, CHECK, dtypes, backends, rng, torch_module)


# --- benchmark ---

# (label, batch, channels (in = out), size, offset groups, with mask)
LAYERS = [
    ("B8 C64 56 Go1 v2", 8, 64, 56, 1, True),
    ("B8 C64 56 Go4 v2", 8, 64, 56, 4, True),
    ("B16 C128 56 Go1 v1", 16, 128, 56, 1, False),
    ("B32 C256 56 Go4 v2", 32, 256, 56, 4, True),
    ("B8 C64 100 Go1 v2", 8, 64, 100, 1, True),
    ("B8 C256 100 Go4 v2", 8, 256, 100, 4, True),
]
QUICK = ("B8 C64 56 Go1 v2", "B8 C64 100 Go1 v2")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """3x3, stride 1, padding 1 DCN layers, forward and forward+backward."""
    cases = []
    for dtype in timed_dtypes(dtypes, torch_module):
        for label, batch, channels, size, groups, with_mask in timed_layers(LAYERS, quick, QUICK):
            flops = 2.0 * batch * channels * size * size * channels * 9
            shapes = [(batch, channels, size, size), (batch, 2 * groups * 9, size, size), (channels, channels, 3, 3)]
            scales = [1.0, 1.0, (channels * 9) ** -0.5]
            if with_mask:
                shapes.append((batch, groups * 9, size, size))
                scales.append(0.5)
            for pass_ in FWD_BWD:
                cases.append(_case(label, dtype, pass_, shapes, scales, flops, torch_module))
    return cases


def _case(label, dtype, pass_, shapes, scales, flops, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    y_shape = (shapes[0][0], shapes[2][0], shapes[0][2], shapes[0][3])
    if backward:
        shapes, scales = shapes + [y_shape], scales + [1.0]
    with_mask = len(shapes) - backward == 4

    def split(arrays):
        x, offset, weight = arrays[:3]
        mask = arrays[3] if with_mask else None
        gy = arrays[-1] if backward else None
        return x, offset, weight, mask, gy

    def run_cuconv(*arrays):
        x, offset, weight, mask, gy = split(arrays)
        deform_conv2d(x, offset, weight, padding=1, mask=mask)
        if backward:
            deform_conv2d_backward(gy, x, offset, weight, padding=1, mask=mask, wrt=("input", "offset", "weight",
                                                                                      "mask"))

    return BenchCase(NAME, label, dtype, pass_, flops * (3 if backward else 1),
                     random_inputs(shapes, dtype, backward, scales, torch), run_cuconv,
                     _baselines(torch, split, backward))


def _baselines(torch, split, backward) -> dict:
    """torchvision.ops.deform_conv2d when importable, and F.conv2d of the same shape."""
    if torch is None:
        return {}
    baselines = {}
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except ImportError:
        tv_deform_conv2d = None
    if tv_deform_conv2d is not None:
        def run_torchvision(*arrays):
            x, offset, weight, mask, gy = split(arrays)
            y = tv_deform_conv2d(x, offset, weight, padding=1, mask=mask)
            if backward:
                torch.autograd.grad(y, [a for a in (x, offset, weight, mask) if a is not None], gy)

        baselines["torchvision"] = (lambda s: s, run_torchvision)

    def run_conv(*arrays):
        x, _, weight, _, gy = split(arrays)
        y = torch.nn.functional.conv2d(x, weight, padding=1)
        if backward:
            torch.autograd.grad(y, (x, weight), gy)

    baselines["torch conv2d"] = (lambda s: s, run_conv)
    return baselines
