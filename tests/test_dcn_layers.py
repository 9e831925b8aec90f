"""cuconv.torch.DCNv3 and DCNv4 against implementations of the official modules written
here (InternImage's ops_dcnv3/modules/dcnv3.py DCNv3, FlashInternImage's
DCNv4_op/DCNv4/modules/dcnv4.py DCNv4): the same constructor arguments and parameter
names, the core a pure-torch aggregation (bench.dcn.torch_dcnv3 / torch_dcnv4, grid_sample
on the official CUDA kernels' geometry).

Checked, in float64 on CPU tensors: an official-style state_dict loads into cuconv's layer
with strict=True and back; after the load, the forward and the gradient of every parameter
and of the input agree; centre-feature scale on and off, remove_center, the norm and
activation choices, DCNv4's dw_kernel_size, without_pointwise and output_bias; the
official initialisation; a configuration that changes the size raises ValueError."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cuconv.torch as ct
from bench.dcn import dcnv4_channels, torch_dcnv3, torch_dcnv4

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


# --- the official modules, written again: official names, official forward ---

class ChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def official_norm(channels, kind):
    """build_norm_layer(channels, kind, 'channels_first', 'channels_last') of InternImage."""
    if kind == "LN":
        return nn.Sequential(ChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    return nn.Sequential(nn.BatchNorm2d(channels), ChannelsLast())


def mix_centre(scale_input, weight, bias, y, x_proj, group_channels):
    s = torch.sigmoid(F.linear(scale_input, weight, bias))  # [N, H, W, G]
    s = s[..., None].expand(*s.shape, group_channels).flatten(-2)
    return y * (1 - s) + x_proj * s


class OfficialDCNv3(nn.Module):
    def __init__(self, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1, dilation=1, group=4,
                 offset_scale=1.0, act_layer="GELU", norm_layer="LN", center_feature_scale=False, remove_center=False):
        super().__init__()
        dw = kernel_size if dw_kernel_size is None else dw_kernel_size
        self.kernel_size, self.stride, self.pad, self.dilation, self.group = kernel_size, stride, pad, dilation, group
        self.offset_scale, self.remove_center = offset_scale, int(remove_center)
        self.center_feature_scale, self.group_channels = center_feature_scale, channels // group
        act = {"GELU": nn.GELU(), "ReLU": nn.ReLU(), "SiLU": nn.SiLU()}[act_layer]
        self.dw_conv = nn.Sequential(nn.Conv2d(channels, channels, dw, padding=(dw - 1) // 2, groups=channels),
                                     official_norm(channels, norm_layer), act)
        taps = kernel_size * kernel_size - self.remove_center
        self.offset = nn.Linear(channels, group * taps * 2)
        self.mask = nn.Linear(channels, group * taps)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def forward(self, input):
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1)
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
        y = torch_dcnv3(F, x, offset, mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                        self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            y = mix_centre(x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias, y, x,
                           self.group_channels)
        return self.output_proj(y)


class OfficialDCNv4(nn.Module):
    def __init__(self, channels=64, kernel_size=3, stride=1, pad=1, dilation=1, group=4, offset_scale=1.0,
                 dw_kernel_size=None, center_feature_scale=False, remove_center=False, output_bias=True,
                 without_pointwise=False):
        super().__init__()
        self.kernel_size, self.stride, self.pad, self.dilation, self.group = kernel_size, stride, pad, dilation, group
        self.offset_scale, self.remove_center = offset_scale, int(remove_center)
        self.center_feature_scale, self.group_channels = center_feature_scale, channels // group
        self.dw_kernel_size, self.without_pointwise = dw_kernel_size, without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                                            groups=channels)
        self.offset_mask = nn.Linear(channels, int(math.ceil(self.K * 3 / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def forward(self, input, shape=None):
        n, length, c = input.shape
        h, w = shape if shape is not None else (int(length ** 0.5),) * 2
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, -1)
        om_in = input
        if self.dw_kernel_size is not None:
            om_in = self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            om_in = om_in.reshape(n, length, c)
        offset_mask = self.offset_mask(om_in).reshape(n, h, w, -1)
        x_proj = x
        y = torch_dcnv4(F, x, offset_mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                        self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:  # the official module computes the scale from the aggregation
            y = mix_centre(y, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias, y, x_proj,
                           self.group_channels)
        y = y.reshape(n, length, -1)
        return y if self.without_pointwise else self.output_proj(y)


# --- helpers ---

def randomise(module, channels, seed):
    """Every parameter and buffer random (the official initialisation zeroes the offset and
    mask linears, which would hide their gradients): offsets of about 1.5 pixels, so some
    taps leave the image; BatchNorm running variances positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.5 / math.sqrt(channels) if name.split(".")[0] in ("offset", "offset_mask") else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)


def compare(official, mine, x, forward):
    """Forward and every gradient of `official` and `mine` on the same input."""
    gy = None
    results = []
    for module in (official, mine):
        xi = x.clone().requires_grad_()
        y = forward(module, xi)
        if gy is None:
            gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xi, *module.parameters()], gy)
        results.append((y, dict(zip(["input", *(n for n, _ in module.named_parameters())], grads))))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, **TOL)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert y0.abs().max() > 0.1 and g0["input"].abs().max() > 0.1  # not a trivial case
    return g1


def load_both_ways(official_cls, mine_cls, channels, seed, **kwargs):
    """(official, mine) in float64, mine loaded from the randomised official strictly, and
    a fresh official loaded back from mine strictly, which must then equal the first."""
    torch.manual_seed(seed)
    official = official_cls(channels, **kwargs).to(F64)
    randomise(official, channels, seed)
    mine = mine_cls(channels, **kwargs, dtype=F64)
    mine.load_state_dict(official.state_dict(), strict=True)
    back = official_cls(channels, **kwargs).to(F64)
    back.load_state_dict(mine.state_dict(), strict=True)
    for (name, a), (_, b) in zip(official.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert list(official.state_dict()) == list(back.state_dict())
    return official, mine


# --- the oracle itself: the grid_sample core against explicit bilinear loops ---

def explicit_dcnv3(x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    """The issue's rules one sample at a time (kernel_size etc. as (h, w) pairs)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    d, cx, cy = c // groups, dw * (kw - 1) // 2, dh * (kh - 1) // 2
    out = torch.zeros(n, ho, wo, c, dtype=x.dtype)
    for b in range(n):
        for oh in range(ho):
            for ow in range(wo):
                for g in range(groups):
                    k = 0
                    for i in range(kw):  # x outside
                        for j in range(kh):
                            if remove_center and (i, j) == (kw // 2, kh // 2):
                                continue
                            dx, dy = offset[b, oh, ow, (g * mask.shape[-1] // groups + k) * 2:][:2].tolist()
                            px = ow * sw - pw + cx + offset_scale * (i * dw - cx + dx)
                            py = oh * sh - ph + cy + offset_scale * (j * dh - cy + dy)
                            m = mask[b, oh, ow, g * mask.shape[-1] // groups + k]
                            k += 1
                            if not (py > -1 and px > -1 and py < h and px < w):
                                continue
                            y0, x0 = math.floor(py), math.floor(px)
                            for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    weight = (1 - abs(py - yy)) * (1 - abs(px - xx))
                                    out[b, oh, ow, g * d:(g + 1) * d] += m * weight * x[b, yy, xx, g * d:(g + 1) * d]
    return out


@pytest.mark.parametrize("kernel_size, stride, padding, dilation, groups, scale, remove_center", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 2, 1.0, False),
    ((2, 3), (2, 1), (0, 2), (1, 2), 1, 0.6, False),
    ((3, 5), (1, 2), (1, 2), (2, 1), 3, 1.7, True),
])
def test_torch_core_matches_explicit_loops(kernel_size, stride, padding, dilation, groups, scale, remove_center):
    """bench.dcn.torch_dcnv3 (the oracle of these tests and the bench baseline) against the
    rules written out: tap order x outside, the floored centre, offset_scale on grid and
    offset, the -1 < p < size window, zero neighbours outside; and torch_dcnv4 on the
    packed offset_mask equals it."""
    torch.manual_seed(1)
    (kh, kw), taps = kernel_size, kernel_size[0] * kernel_size[1] - remove_center
    h, w = 5, 6
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(2, h, w, 2 * groups, dtype=F64)
    offset = torch.randn(2, ho, wo, groups * taps * 2, dtype=F64) * 2
    mask = torch.randn(2, ho, wo, groups * taps, dtype=F64)
    args = (kernel_size, stride, padding, dilation, groups, scale, remove_center)
    expected = explicit_dcnv3(x, offset, mask, *args)
    torch.testing.assert_close(torch_dcnv3(F, x, offset, mask, *args), expected, rtol=1e-12, atol=1e-12)
    p = dcnv4_channels(groups, taps) + 8
    packed = torch.cat((offset.reshape(2, ho, wo, groups, 2 * taps), mask.reshape(2, ho, wo, groups, taps)), -1)
    offset_mask = torch.cat((packed.reshape(2, ho, wo, -1), torch.randn(2, ho, wo, p - 3 * groups * taps,
                                                                       dtype=F64)), -1)
    torch.testing.assert_close(torch_dcnv4(F, x, offset_mask, *args), expected, rtol=1e-12, atol=1e-12)


# --- DCNv3 ---

V3_CASES = [
    ("default", dict(group=2)),
    ("cfs", dict(group=4, center_feature_scale=True)),
    ("remove_center cfs", dict(group=2, remove_center=True, center_feature_scale=True)),
    ("BN ReLU dw5 s0.7", dict(group=2, norm_layer="BN", act_layer="ReLU", dw_kernel_size=5, offset_scale=0.7)),
    ("5x5 d1 p2 SiLU", dict(group=4, kernel_size=5, pad=2, act_layer="SiLU")),
    ("3x3 d2 p2 remove_center", dict(group=2, dilation=2, pad=2, remove_center=True, offset_scale=1.5)),
]


@pytest.mark.parametrize("label, kwargs", V3_CASES, ids=[c[0] for c in V3_CASES])
def test_dcnv3_matches_official(label, kwargs):
    official, mine = load_both_ways(OfficialDCNv3, ct.DCNv3, 16, 3, **kwargs)
    x = torch.randn(2, 5, 6, 16, dtype=F64)
    compare(official, mine, x, lambda m, t: m(t))


def test_dcnv3_state_dict_names():
    """The official module's parameter and buffer names, for each norm."""
    keys = set(ct.DCNv3(16, group=2, center_feature_scale=True).state_dict())
    assert keys == {"dw_conv.0.weight", "dw_conv.0.bias", "dw_conv.1.1.weight", "dw_conv.1.1.bias",
                    "offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.weight",
                    "input_proj.bias", "output_proj.weight", "output_proj.bias",
                    "center_feature_scale_proj_weight", "center_feature_scale_proj_bias"}
    bn = set(ct.DCNv3(16, group=2, norm_layer="BN").state_dict())
    assert {k for k in bn if k.startswith("dw_conv.1")} == {
        "dw_conv.1.0.weight", "dw_conv.1.0.bias", "dw_conv.1.0.running_mean", "dw_conv.1.0.running_var",
        "dw_conv.1.0.num_batches_tracked"}
    shapes = {k: tuple(v.shape) for k, v in ct.DCNv3(16, group=2, remove_center=True).state_dict().items()}
    assert shapes["offset.weight"] == (2 * 8 * 2, 16) and shapes["mask.weight"] == (2 * 8, 16)


def test_dcnv3_initialisation():
    layer = ct.DCNv3(32, group=4, center_feature_scale=True)
    for name in ("offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.bias", "output_proj.bias",
                 "center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
        assert not layer.state_dict()[name].any(), name
    bound = math.sqrt(6 / 64)  # xavier_uniform on 32 x 32
    for linear in (layer.input_proj, layer.output_proj):
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3
    assert layer.offset.weight.dtype == torch.float32


# --- DCNv4 ---

V4_CASES = [
    ("default", dict(group=2)),
    ("dw3 cfs", dict(group=2, dw_kernel_size=3, center_feature_scale=True)),
    ("remove_center s1.3", dict(group=4, remove_center=True, offset_scale=1.3)),
    ("without_pointwise", dict(group=2, without_pointwise=True, dw_kernel_size=3)),
    ("no output bias cfs", dict(group=1, output_bias=False, center_feature_scale=True)),
    ("5x5 p2", dict(group=2, kernel_size=5, pad=2)),
]


@pytest.mark.parametrize("label, kwargs", V4_CASES, ids=[c[0] for c in V4_CASES])
def test_dcnv4_matches_official(label, kwargs):
    official, mine = load_both_ways(OfficialDCNv4, ct.DCNv4, 16, 4, **kwargs)
    x = torch.randn(2, 5 * 6, 16, dtype=F64)
    grads = compare(official, mine, x, lambda m, t: m(t, shape=(5, 6)))
    used = 3 * mine.K  # the offset_mask rows past 3GK feed nothing: exactly zero gradient
    assert mine.offset_mask.out_features == dcnv4_channels(1, mine.K)
    assert not grads["offset_mask.weight"][used:].any() and not grads["offset_mask.bias"][used:].any()


def test_dcnv4_square_input_without_shape():
    official, mine = load_both_ways(OfficialDCNv4, ct.DCNv4, 16, 5, group=2)
    x = torch.randn(1, 25, 16, dtype=F64)
    compare(official, mine, x, lambda m, t: m(t))
    with pytest.raises(ValueError, match="shape"):
        mine(torch.randn(1, 30, 16, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        mine(torch.randn(1, 30, 16, dtype=F64), shape=(5, 5))


def test_dcnv4_state_dict_names():
    keys = set(ct.DCNv4(32, group=2, dw_kernel_size=3, center_feature_scale=True).state_dict())
    assert keys == {"offset_mask_dw.weight", "offset_mask_dw.bias", "offset_mask.weight", "offset_mask.bias",
                    "value_proj.weight", "value_proj.bias", "output_proj.weight", "output_proj.bias",
                    "center_feature_scale_proj_weight", "center_feature_scale_proj_bias"}
    assert set(ct.DCNv4(32, group=2, without_pointwise=True).state_dict()) == {"offset_mask.weight",
                                                                                "offset_mask.bias"}
    assert "output_proj.bias" not in ct.DCNv4(32, group=2, output_bias=False).state_dict()
    # P = ceil(3 G K / 8) * 8: G=2, K=9 -> 54 -> 56; G=4, K=8 (remove_center) -> 96
    assert ct.DCNv4(32, group=2).offset_mask.out_features == 56
    assert ct.DCNv4(32, group=4, remove_center=True).offset_mask.out_features == 96


def test_dcnv4_initialisation_and_group_channels():
    """Zero offset_mask at the start; any group_channels (the official module wants a
    multiple of 16)."""
    layer = ct.DCNv4(12, group=4)
    assert not layer.offset_mask.weight.any() and not layer.offset_mask.bias.any()
    assert not layer.value_proj.bias.any() and not layer.output_proj.bias.any()
    # a zero offset_mask means a zero mask: the aggregation is 0 and so is the output
    y = layer(torch.randn(2, 20, 12), shape=(4, 5))
    assert y.shape == (2, 20, 12) and not y.any()


# --- sizes and bad arguments ---

@pytest.mark.parametrize("layer", [ct.DCNv3, ct.DCNv4])
def test_size_changing_configuration_raises(layer):
    with pytest.raises(ValueError, match="input's size"):
        layer(16, kernel_size=3, pad=0, group=2)
    with pytest.raises(ValueError, match="input's size"):
        layer(16, kernel_size=3, pad=2, group=2)
    with pytest.raises(ValueError, match="input's size"):
        layer(16, kernel_size=3, pad=1, dilation=2, group=2)
    strided = layer(16, kernel_size=3, stride=2, pad=1, group=2)  # fits a 1x1 input only: checked at the call
    x = torch.randn(1, 5, 6, 16) if layer is ct.DCNv3 else torch.randn(1, 30, 16)
    with pytest.raises(ValueError, match="input's size"):
        strided(x) if layer is ct.DCNv3 else strided(x, shape=(5, 6))


@pytest.mark.parametrize("layer", [ct.DCNv3, ct.DCNv4])
def test_bad_arguments_raise(layer):
    with pytest.raises(ValueError, match="divisible"):
        layer(18, group=4)
    with pytest.raises(ValueError, match="odd"):
        layer(16, kernel_size=4, pad=1, dilation=1, group=2, remove_center=True)


def test_dcnv3_bad_norm_or_activation():
    with pytest.raises(ValueError, match="norm_layer"):
        ct.DCNv3(16, group=2, norm_layer="GN")
    with pytest.raises(ValueError, match="act_layer"):
        ct.DCNv3(16, group=2, act_layer="Tanh")


def test_layers_float32_default_and_exported():
    assert {"DCNv3", "DCNv4"} <= set(ct.__all__)
    torch.manual_seed(0)
    y3 = ct.DCNv3(16, group=2)(torch.randn(1, 4, 5, 16))
    y4 = ct.DCNv4(16, group=2)(torch.randn(1, 20, 16), shape=(4, 5))
    assert y3.shape == (1, 4, 5, 16) and y3.dtype == torch.float32 and y3.isfinite().all()
    assert y4.shape == (1, 20, 16) and y4.dtype == torch.float32


def test_layers_compile_and_autocast():
    """torch.compile(fullgraph=True) traces both layers (the ops are single nodes) and gives
    eager mode's result; under CPU autocast the ops run in bfloat16."""
    torch.manual_seed(0)
    dcn3 = ct.DCNv3(16, group=2, center_feature_scale=True, dtype=F64)
    dcn4 = ct.DCNv4(16, group=2, dw_kernel_size=3, center_feature_scale=True, dtype=F64)
    randomise(dcn3, 16, 7)
    randomise(dcn4, 16, 8)

    def model(t):
        return dcn4(dcn3(t).reshape(2, 30, 16), shape=(5, 6))

    x = torch.randn(2, 5, 6, 16, dtype=F64)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ct.DCNv4(16, group=2)(ct.DCNv3(16, group=2)(torch.randn(2, 5, 6, 16)).reshape(2, 30, 16), shape=(5, 6))
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
