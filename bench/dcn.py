"""dcn suite: DCNv3 and DCNv4, the deformable aggregations of InternImage (Wang et al.,
CVPR 2023) and FlashInternImage (Xiong et al., CVPR 2024). The self-check compares both
ops, forward and every gradient, with cuconv.reference.dcn; the timed rows run them on
InternImage-T stage shapes against a torch grid_sample implementation of the official
PyTorch core (torch_dcnv3 / torch_dcnv4 below, also the tests' oracle) and, when its
package is importable on the GPU, the official DCNv4 kernel.

Shapes (InternImage-T at 224x224, batch 32): the 3x3 DCN of each stage, C = 64 / 128 /
256 / 512 channels at 56x56 / 28x28 / 14x14 / 7x7, G = C / 16 groups (16 channels a
group), stride 1, pad 1. The ops move data and compute little (about 10 flops per channel
and tap), so rows are rated by the bytes they must move: input, offsets and mask read and
the output written for the forward; for forward + backward, also the output gradient
read, input, offsets and mask read again, and their three gradients written.
"""

from __future__ import annotations

import math

from cuconv.ops.dcn import dcnv3, dcnv3_backward, dcnv4, dcnv4_backward
from cuconv.reference import dcn as reference

from .harness import (FWD_BWD, HOST_DTYPES, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, timed_dtypes,
                      timed_layers)

NAME = "dcn"
OPS = ("dcnv3", "dcnv4")  # the public ops it checks and times


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def dcn_taps(kernel_size, dilation=1, remove_center=False):
    """The taps in the official order, x outside: [(i*dw - cx, j*dh - cy)] for i < kw, j < kh,
    the centre (kw//2, kh//2) left out with remove_center; cx = (dw (kw-1)) // 2 and
    cy = (dh (kh-1)) // 2 (floored)."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    cx, cy = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    return [(i * dw - cx, j * dh - cy) for i in range(kw) for j in range(kh)
            if not (remove_center and i == kw // 2 and j == kh // 2)]


def torch_dcnv3(F, input, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
                remove_center=False):
    """The official PyTorch core (InternImage's dcnv3_core_pytorch) written again on the
    official CUDA kernels' geometry, in the tensors' dtype with autograd: every tap of every
    group samples with one F.grid_sample call (zeros padding, align_corners=False, pixel
    (y, x) normalised to ((2x+1)/W - 1, (2y+1)/H - 1) so it lands exactly on the sampling
    point). Tap (i, j) of group g at output (oh, ow) samples
        px = ow sw - pw + cx + s (i dw - cx + dx),   py = oh sh - ph + cy + s (j dh - cy + dy)
    and the output is sum_k mask * sample. input [N, H, W, G*D], offset [N, Ho, Wo, G*K*2]
    ((dx, dy) pairs, tap-major within a group), mask [N, Ho, Wo, G*K] -> [N, Ho, Wo, G*D].
    Unlike the official PyTorch core it pads H by ph and W by pw (the CUDA kernels' rule)."""
    import torch

    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, h, w, c = input.shape
    _, ho, wo, _ = offset.shape
    g, s = groups, offset_scale
    taps = dcn_taps(kernel_size, dilation, remove_center)
    k = len(taps)
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    cx, cy = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    like = {"dtype": input.dtype, "device": input.device}
    tap_x = torch.tensor([t[0] for t in taps], **like)
    tap_y = torch.tensor([t[1] for t in taps], **like)
    off = offset.reshape(n, ho, wo, g, k, 2)
    base_x = (torch.arange(wo, **like) * sw - pw + cx)[None, None, :, None, None]
    base_y = (torch.arange(ho, **like) * sh - ph + cy)[None, :, None, None, None]
    px = base_x + s * (tap_x + off[..., 0])  # [N, Ho, Wo, G, K]
    py = base_y + s * (tap_y + off[..., 1])
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, k, 2)
    value = input.reshape(n, h, w, g, c // g).permute(0, 3, 4, 1, 2).reshape(n * g, c // g, h, w)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.reshape(n, ho, wo, g, k).permute(0, 3, 1, 2, 4).reshape(n * g, 1, ho * wo, k)
    out = (sampled * weights).sum(-1)  # [N*G, D, Ho*Wo]
    return out.reshape(n, g, c // g, ho, wo).permute(0, 3, 4, 1, 2).reshape(n, ho, wo, c)


def dcnv4_unpack(offset_mask, groups, taps):
    """DCNv4's offset_mask [N, Ho, Wo, P] as DCNv3's (offset [.., G*K*2], mask [.., G*K]):
    group g owns channels [3gK, 3(g+1)K), its K (dx, dy) pairs then its K mask values;
    channels from 3GK up are padding."""
    n, ho, wo, _ = offset_mask.shape
    packed = offset_mask[..., :3 * groups * taps].reshape(n, ho, wo, groups, 3 * taps)
    return (packed[..., :2 * taps].reshape(n, ho, wo, 2 * groups * taps),
            packed[..., 2 * taps:].reshape(n, ho, wo, groups * taps))


def torch_dcnv4(F, input, offset_mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
                remove_center=False):
    """DCNv4 in torch: DCNv3 (torch_dcnv3) on the unpacked offset_mask, the mask as given."""
    offset, mask = dcnv4_unpack(offset_mask, groups, len(dcn_taps(kernel_size, dilation, remove_center)))
    return torch_dcnv3(F, input, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale,
                       remove_center)


def dcnv4_channels(groups, taps) -> int:
    """The official module's offset_mask width P = ceil(3 G K / 8) * 8."""
    return math.ceil(3 * groups * taps / 8) * 8


# --- self-check: small odd shapes that cover every parameter ---

def _v3_shapes(n, h, w, g, d, ho, wo, taps):
    return ((n, h, w, g * d), (n, ho, wo, 2 * g * taps), (n, ho, wo, g * taps))


def _v4_shapes(n, h, w, g, d, ho, wo, taps, p=None):
    return ((n, h, w, g * d), (n, ho, wo, p or dcnv4_channels(g, taps)))


# (label, input / offset / mask shapes, params)
CHECK_V3 = [
    ("3x3 p1 G2 D3", _v3_shapes(2, 5, 6, 2, 3, 5, 6, 9), dict(kernel_size=3, padding=1, groups=2)),
    ("3x3 s2 d2 p2 G3 D2 s1.5", _v3_shapes(1, 7, 6, 3, 2, 4, 3, 9),
     dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=3, offset_scale=1.5)),
    ("2x3 p(0,1) G1 D4 s0.5", _v3_shapes(2, 5, 4, 1, 4, 4, 4, 6),
     dict(kernel_size=(2, 3), padding=(0, 1), offset_scale=0.5)),
    ("5x5 p2 G4 D1 no-centre", _v3_shapes(1, 6, 5, 4, 1, 6, 5, 24),
     dict(kernel_size=5, padding=2, groups=4, remove_center=True)),
]
CHECK_V4 = [
    ("3x3 p1 G2 D3 P56", _v4_shapes(2, 5, 6, 2, 3, 5, 6, 9), dict(kernel_size=3, padding=1, groups=2)),
    ("3x1 s(1,2) G1 D5 P16", _v4_shapes(1, 6, 7, 1, 5, 4, 4, 3, 16),
     dict(kernel_size=(3, 1), stride=(1, 2), groups=1, offset_scale=2.0)),
    ("3x3 d2 p2 G2 D2 no-centre", _v4_shapes(1, 5, 5, 2, 2, 5, 5, 8),
     dict(kernel_size=3, padding=2, dilation=2, groups=2, remove_center=True)),
]

DCNV3 = OpCheck("dcnv3", dcnv3, dcnv3_backward, reference.dcnv3, reference.dcnv3_backward, torch_dcnv3,
                ("input", "offset", "mask"))
DCNV4 = OpCheck("dcnv4", dcnv4, dcnv4_backward, reference.dcnv4, reference.dcnv4_backward, torch_dcnv4,
                ("input", "offset_mask"))


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return (self_check_op(DCNV3, CHECK_V3, dtypes, backends, rng, torch_module)
            + self_check_op(DCNV4, CHECK_V4, dtypes, backends, rng, torch_module))


# --- benchmark ---

BATCH = 32
# (label, channels, groups, size): InternImage-T's four stages
LAYERS = [
    ("InternImage-T s1 C64 G4 56x56", 64, 4, 56),
    ("InternImage-T s2 C128 G8 28x28", 128, 8, 28),
    ("InternImage-T s3 C256 G16 14x14", 256, 16, 14),
    ("InternImage-T s4 C512 G32 7x7", 512, 32, 7),
]
QUICK = ("InternImage-T s1 C64 G4 56x56", "InternImage-T s4 C512 G32 7x7")
TAPS = 9  # 3x3, stride 1, pad 1


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    """dcnv3 and dcnv4 on each stage, forward and forward+backward."""
    return [_case(op, layer, dtype, pass_, torch_module) for op in ("dcnv3", "dcnv4")
            for layer in timed_layers(LAYERS, quick, QUICK) for dtype in timed_dtypes(dtypes, torch_module)
            for pass_ in FWD_BWD]


def _case(op, layer, dtype, pass_, torch) -> BenchCase:
    label, c, g, size = layer
    backward = pass_ == "fwd+bwd"
    x_shape = (BATCH, size, size, c)
    if op == "dcnv3":
        shapes = [x_shape, (BATCH, size, size, 2 * g * TAPS), (BATCH, size, size, g * TAPS)]
        scales = [1.0, 1.0, 1.0 / TAPS]
    else:
        shapes = [x_shape, (BATCH, size, size, dcnv4_channels(g, TAPS))]
        scales = [1.0, 1.0]
    arrays = len(shapes)
    elements = sum(math.prod(s) for s in shapes)
    # forward: the arrays read and y written; backward: gy read, the arrays read again, their gradients written
    moved = elements + math.prod(x_shape) + (math.prod(x_shape) + 2 * elements if backward else 0)
    if backward:
        shapes, scales = shapes + [x_shape], scales + [1.0]
    params = dict(kernel_size=3, padding=1, groups=g)
    forward, backward_fn, torch_core = ((dcnv3, dcnv3_backward, torch_dcnv3) if op == "dcnv3"
                                        else (dcnv4, dcnv4_backward, torch_dcnv4))

    def run_cuconv(*input_set):
        forward(*input_set[:arrays], **params)
        if backward:
            backward_fn(input_set[-1], *input_set[:arrays], **params)

    baselines = {}
    if torch is not None:
        def run_torch(*input_set):
            y = torch_core(torch.nn.functional, *input_set[:arrays], **params)
            if backward:
                torch.autograd.grad(y, input_set[:arrays], input_set[-1])

        baselines["torch grid_sample"] = (lambda s: s, run_torch)
        if op == "dcnv4":
            baselines.update(_official_dcnv4(torch, g, c // g, backward))
    return BenchCase(NAME, f"{op} {label}", dtype, pass_, 0.0, random_inputs(shapes, dtype, backward, scales, torch),
                     run_cuconv, baselines, bytes_moved=float(moved * HOST_DTYPES[dtype].itemsize))


def _official_dcnv4(torch, groups, group_channels, backward) -> dict:
    """The official DCNv4 kernel (the DCNv4 package of OpenGVLab/DCNv4) when importable."""
    try:
        from DCNv4.functions import DCNv4Function
    except Exception:  # not installed, or built for another torch / CUDA: no row
        return {}

    def run_official(x, offset_mask, gy=None):
        y = DCNv4Function.apply(x, offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, groups, group_channels, 1.0, 256, 0)
        if backward:
            torch.autograd.grad(y, (x, offset_mask), gy)

    return {"official DCNv4": (lambda s: s, run_official)}
