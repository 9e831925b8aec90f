"""cuconv.torch: every op as a torch custom op (gradcheck in float64, opcheck of the
registrations, results equal to the cuconv calls), the nn layers against torch-native
implementations of the same layers, autocast, channels_last, torch.compile(fullgraph=True)
against eager mode, and a small model that trains. DDP: tests/test_torch_ddp.py.

The `backend` parametrization runs the same tests on CUDA tensors (skipped without a
GPU); CUDA alone has side streams, a second GPU and torch.cuda.graph capture (the
test_cuda_* tests at the end)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cuconv
import cuconv.torch as ct
from cuconv._registry import OPS as OPS_BY_NAME
from conftest import gpu_available

F64 = torch.float64
CUDA = gpu_available() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU (needs CuPy and torch with CUDA)")


def _device(backend: str) -> torch.device:
    """Where the backend's tensors live: the cuda backend takes torch's CUDA tensors."""
    if backend == "interpret":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return torch.device("cuda", torch.cuda.current_device())


def _randn(generator, *shape, dtype=F64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def op_case(op: str, seed: int = 0):
    """(array arguments by name, parameters) of a small float64 call of `op`: its first
    registered example (odd sizes, groups, strides, every optional array present)."""
    g = torch.Generator().manual_seed(seed)
    opdef = OPS_BY_NAME[op]
    example = opdef.examples[0]
    arrays = {}
    for name in opdef.arrays:
        shape = example.shapes[name]
        arrays[name] = _randn(g, *shape)
        if name in opdef.complex_arrays:
            arrays[name] = torch.complex(arrays[name], _randn(g, *shape))
    return arrays, dict(example.params)


OPS = list(ct.OPS)


def test_every_op_has_a_case_and_a_function():
    assert set(OPS) == set(OPS_BY_NAME)
    for op in OPS:
        arrays, _ = op_case(op)
        assert tuple(arrays) == OPS_BY_NAME[op].arrays, f"{op}: the case leaves an array out"
        assert getattr(ct, op).__signature__ == ct.SPECS[op].signature


@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_are_cuconvs(op, backend):
    """The torch function returns cuconv.OP's result on the input's device, and backward
    gives cuconv.OP_backward's there."""
    device = _device(backend)
    arrays, params = op_case(op)
    arrays = {n: a.to(device) for n, a in arrays.items()}
    leaves = {n: a.clone().requires_grad_() for n, a in arrays.items()}
    y = getattr(ct, op)(**leaves, **params)
    expected = getattr(cuconv, op)(**arrays, **params)
    assert y.dtype == expected.dtype and y.is_contiguous() and y.requires_grad
    assert y.device == expected.device == device
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
    gy = _randn(torch.Generator().manual_seed(1), *y.shape).to(device)
    y.backward(gy)
    grads = getattr(cuconv, op + "_backward")(gy, **arrays, **params)
    for name, grad in zip(OPS_BY_NAME[op].arrays, grads):
        assert leaves[name].grad.device == device, name
        torch.testing.assert_close(leaves[name].grad, grad, rtol=0, atol=0, msg=f"{op}: gradient of {name}")


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    """torch.autograd.gradcheck in float64 on every array argument (complex filter included)."""
    arrays, params = op_case(op)
    names = list(arrays)
    fn = getattr(ct, op)
    inputs = tuple(arrays[n].requires_grad_() for n in names)
    assert torch.autograd.gradcheck(lambda *a: fn(**dict(zip(names, a)), **params), inputs)


def _opcheck(op, device):
    spec = ct.SPECS[op]
    arrays, params = op_case(op)
    leaves = {n: a.to(device).requires_grad_() for n, a in arrays.items()}
    args = tuple(spec.to_schema(spec.bind((), {**leaves, **params})))
    torch.library.opcheck(getattr(torch.ops.cuconv, op).default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    gy = _randn(torch.Generator().manual_seed(2), *getattr(cuconv, op)(**arrays, **params).shape).to(device)
    mask = [i % 2 == 0 for i in range(len(arrays))]  # a subset of the gradients
    torch.library.opcheck(getattr(torch.ops.cuconv, op + "_backward").default, (gy, *detached, mask))


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    """torch.library.opcheck: schema, autograd registration, fake tensors (the shape function),
    AOT dispatch with dynamic shapes, for the forward and for the backward op."""
    _opcheck(op, torch.device("cpu"))


@needs_cuda
@pytest.mark.parametrize("op", ["conv2d", "deform_conv2d", "spectral_filter2d"])
def test_cuda_opcheck(op):
    """The same on CUDA tensors: the fake functions (one generic rule for every op) put
    their results on the input's device, complex filter gradient included."""
    _opcheck(op, torch.device("cuda", torch.cuda.current_device()))


def test_optional_arrays_absent_and_string_padding():
    arrays, params = op_case("conv2d")
    x, w = arrays["input"], arrays["weight"][:, :, :, :1]
    for padding in ("same", "valid"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ct.conv2d(xa, w, None, 1, padding, 1, 2)
        expected = F.conv2d(xb, w, None, 1, padding, 1, 2)
        torch.testing.assert_close(y, expected)
        y.backward(torch.ones_like(y))
        expected.backward(torch.ones_like(expected))
        torch.testing.assert_close(xa.grad, xb.grad)
    arrays, params = op_case("odconv2d")
    none = dict(spatial_attention=None, channel_attention=None, filter_attention=None)
    leaves = {n: a.requires_grad_() for n, a in {**arrays, **none}.items() if a is not None}
    torch.autograd.gradcheck(lambda x, w, ka: ct.odconv2d(x, w, ka, **none, **params),
                             (leaves["input"], leaves["weight"], leaves["kernel_attention"]))


def test_only_the_needed_gradients_are_computed(monkeypatch):
    """wrt holds exactly the arrays that require grad."""
    spec = ct.SPECS["deform_conv2d"]
    seen = []
    original = spec.backward_function
    monkeypatch.setattr(spec, "backward_function", lambda *a, **k: (seen.append(k["wrt"]), original(*a, **k))[1])
    arrays, params = op_case("deform_conv2d")
    for wanted in (("offset",), ("input", "mask"), ("weight", "bias")):
        leaves = {n: a.clone().requires_grad_(n in wanted) for n, a in arrays.items()}
        ct.deform_conv2d(**leaves, **params).sum().backward()
        assert seen[-1] == wanted
        assert all((leaves[n].grad is not None) == (n in wanted) for n in leaves)
    with torch.no_grad():
        ct.deform_conv2d(**{n: a.requires_grad_() for n, a in arrays.items()}, **params)
    assert len(seen) == 3


def test_errors_are_cuconvs_eager_and_under_compile():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 5, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        ct.conv2d(x, w)
    with pytest.raises(Exception, match="weight"):  # raised by the fake (shape) function while tracing
        torch.compile(lambda a, b: ct.conv2d(a, b), fullgraph=True, backend="aot_eager")(x, w)
    with pytest.raises(TypeError, match="unexpected"):
        ct.conv2d(x, w, strides=2)


def test_import_cuconv_does_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "import numpy as np, cuconv\n"
            "y = cuconv.conv2d(np.ones((1, 2, 4, 4)), np.ones((3, 2, 3, 3)))\n"
            "assert y.shape == (1, 3, 2, 2) and 'cuconv.torch' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------------------------------
# Layers: each against a torch-native implementation of the same layer, same parameters.

def _compare(layer, native, x, atol=1e-10):
    """Output and every gradient (input and parameters) of layer(x) equal native(x), where
    native is a function of (x, parameters by name) written with torch ops only."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = dict(layer.named_parameters())
    ya = layer(xa)
    copies = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    yb = native(xb, copies)
    torch.testing.assert_close(ya, yb, rtol=0, atol=atol)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=atol)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, copies[n].grad, rtol=0, atol=atol, msg=f"gradient of {n}")


def test_conv2d_layer_is_nn_conv2d(backend):
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2, dtype=F64)
    torch.manual_seed(0)
    native = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2, dtype=F64)
    torch.testing.assert_close(layer.state_dict(), native.state_dict(), rtol=0, atol=0)  # same initialisation
    x = torch.randn(2, 4, 7, 9, dtype=F64, device=device)
    _compare(layer.to(device), lambda x, p: F.conv2d(x, p["weight"], p["bias"], 2, 1, (1, 2), 2), x)
    reflect = ct.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dtype=F64, device=device)
    _compare(reflect, lambda x, p: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), p["weight"], p["bias"]), x)


def test_conv_transpose2d_layer_is_nn_conv_transpose2d(backend):
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=F64).to(device)
    x = torch.randn(2, 4, 5, 4, dtype=F64, device=device)
    _compare(layer, lambda x, p: F.conv_transpose2d(x, p["weight"], p["bias"], 2, 1, 0, 2), x)
    y = layer(x, output_size=(10, 8))
    torch.testing.assert_close(y, F.conv_transpose2d(x, layer.weight, layer.bias, 2, 1, 1, 2))


def test_depthwise_separable_layer(backend):
    device = _device(backend)
    layer = ct.DepthwiseSeparableConv2d(3, 5, 3, stride=2, padding=1, depth_multiplier=2, dtype=F64, device=device)
    assert layer.depthwise_weight.shape == (6, 1, 3, 3) and layer.pointwise_weight.shape == (5, 6, 1, 1)
    native = lambda x, p: F.conv2d(F.conv2d(x, p["depthwise_weight"], p["depthwise_bias"], 2, 1, groups=3),  # noqa
                                   p["pointwise_weight"], p["pointwise_bias"])
    _compare(layer, native, torch.randn(2, 3, 7, 6, dtype=F64, device=device))


def _bilinear_deform_conv(x, offset, weight, bias, mask, padding):
    """torchvision deform_conv2d semantics with grid_sample (zero outside, align_corners=True),
    one offset group, weight groups 1, stride/dilation 1."""
    b, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho, wo = offset.shape[2:]
    oy, ox = torch.meshgrid(torch.arange(ho, dtype=x.dtype, device=x.device),
                            torch.arange(wo, dtype=x.dtype, device=x.device), indexing="ij")
    samples = []
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        ys = oy - padding + i + offset[:, 2 * t]
        xs = ox - padding + j + offset[:, 2 * t + 1]
        grid = torch.stack([2 * xs / (w - 1) - 1, 2 * ys / (h - 1) - 1], dim=-1)
        s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        samples.append(s * (1 if mask is None else mask[:, t:t + 1]))
    cols = torch.stack(samples, dim=2)  # [B, C, K, Ho, Wo]
    return torch.einsum("bckhw,ock->bohw", cols, weight.reshape(weight.shape[0], c, -1)) + bias[:, None, None]


@pytest.mark.parametrize("modulated", [True, False])
def test_deform_conv2d_layer(modulated, backend):
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.DeformConv2d(3, 4, 3, padding=1, modulated=modulated, dtype=F64).to(device)
    predictor = layer.offset_predictor
    assert predictor.weight.shape == ((27 if modulated else 18), 3, 3, 3)
    assert not predictor.weight.any() and not predictor.bias.any()  # DCN's zero initialisation
    x = torch.randn(2, 3, 6, 5, dtype=F64, device=device)
    start = layer(x)
    conv = F.conv2d(x, layer.weight, None, padding=1)
    torch.testing.assert_close(start, (0.5 * conv if modulated else conv) + layer.bias[:, None, None])
    with torch.no_grad():
        predictor.weight.normal_(0, 0.3)
        predictor.bias.normal_(0, 0.3)

    def native(x, p):
        out = F.conv2d(x, p["offset_predictor.weight"], p["offset_predictor.bias"], padding=1)
        mask = torch.sigmoid(out[:, 18:]) if modulated else None
        return _bilinear_deform_conv(x, out[:, :18], p["weight"], p["bias"], mask, 1)
    _compare(layer, native, x)


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 7)])
def test_involution2d_layer_is_rednets(stride, size, backend):
    """d-li14/involution's unfold implementation (with the ceil-mode pool for odd sizes)."""
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.Involution2d(8, 3, stride=stride, group_channels=4, dtype=F64).to(device)
    assert layer.span.weight.shape == (2 * 9, 2, 1, 1) and layer.reduce.weight.shape == (2, 8, 1, 1)
    layer.train()

    def native(x, p):
        pooled = x if stride == 1 else F.avg_pool2d(x, stride, stride, ceil_mode=True)
        h = F.conv2d(pooled, p["reduce.weight"])
        h = F.relu(F.batch_norm(h, None, None, p["norm.weight"], p["norm.bias"], training=True))
        k = F.conv2d(h, p["span.weight"], p["span.bias"])
        b, _, ho, wo = k.shape
        k = k.view(b, 2, 9, ho, wo).unsqueeze(2)
        cols = F.unfold(x, 3, 1, 1, stride).view(b, 2, 4, 9, ho, wo)
        return (k * cols).sum(dim=3).view(b, 8, ho, wo)
    _compare(layer, native, torch.randn(2, 8, size, size, dtype=F64, device=device))


def test_dynamic_conv2d_layer_is_batch_folded_grouped_conv(backend):
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.DynamicConv2d(4, 6, 3, padding=1, groups=2, num_experts=3, temperature=2.0, dtype=F64).to(device)
    x = torch.randn(3, 4, 5, 6, dtype=F64, device=device)
    torch.testing.assert_close(layer.attention(x).sum(1), torch.ones(3, dtype=F64, device=device))

    def native(x, p):
        a = torch.softmax(F.linear(F.relu(F.linear(x.mean((2, 3)), p["fc1.weight"])), p["fc2.weight"],
                                   p["fc2.bias"]) / 2.0, dim=1)
        w = torch.einsum("bk,koihw->boihw", a, p["weight"]).reshape(3 * 6, 2, 3, 3)
        y = F.conv2d(x.reshape(1, 3 * 4, 5, 6), w, (a @ p["bias"]).reshape(-1), padding=1, groups=3 * 2)
        return y.view(3, 6, 5, 6)
    _compare(layer, native, x)


@pytest.mark.parametrize("depthwise", [False, True])
def test_odconv2d_layer(depthwise, backend):
    device = _device(backend)
    torch.manual_seed(0)
    c, groups = (6, 6) if depthwise else (6, 2)
    layer = ct.ODConv2d(6, c, 3, padding=1, groups=groups, kernel_num=3, min_channel=4, temperature=1.5,
                        dtype=F64).to(device)
    assert (layer.filter_fc is None) == depthwise
    x = torch.randn(3, 6, 5, 5, dtype=F64, device=device)

    def native(x, p):
        h = F.relu(F.batch_norm(F.linear(x.mean((2, 3)), p["fc.weight"]), None, None, p["norm.weight"],
                                p["norm.bias"], training=True))
        head = lambda name: F.linear(h, p[name + ".weight"], p[name + ".bias"]) / 1.5  # noqa: E731
        ca, ka = torch.sigmoid(head("channel_fc")), torch.softmax(head("kernel_fc"), 1)
        sa = torch.sigmoid(head("spatial_fc")).view(3, 1, 1, 1, 3, 3)
        fa = torch.ones(3, c, dtype=F64, device=x.device) if depthwise else torch.sigmoid(head("filter_fc"))
        w = (ka[:, :, None, None, None, None] * (sa * p["weight"][None])).sum(1)  # [B, Cout, Cin/g, 3, 3]
        xs = (x * ca[:, :, None, None]).reshape(1, 3 * 6, 5, 5)
        y = F.conv2d(xs, w.reshape(3 * c, 6 // groups, 3, 3), padding=1, groups=3 * groups).view(3, c, 5, 5)
        return y * fa[:, :, None, None]
    _compare(layer, native, x)


def test_pixel_shuffle_and_subpixel_layers(backend):
    device = _device(backend)
    x = torch.randn(2, 8, 3, 5, dtype=F64, device=device)
    _compare(ct.PixelShuffle(2), lambda x, p: F.pixel_shuffle(x, 2), x, atol=0)
    _compare(ct.PixelUnshuffle(2), lambda x, p: F.pixel_unshuffle(x, 2),
             torch.randn(1, 2, 4, 6, dtype=F64, device=device), atol=0)
    layer = ct.SubPixelConv2d(8, 3, 3, upscale_factor=2, padding=1, dtype=F64, device=device)
    assert layer.weight.shape == (12, 8, 3, 3)
    _compare(layer, lambda x, p: F.pixel_shuffle(F.conv2d(x, p["weight"], p["bias"], padding=1), 2), x)
    icnr = ct.SubPixelConv2d(8, 3, 3, upscale_factor=2, padding=1, icnr=True)
    for sub in range(4):  # the r*r sub-kernels of an output channel start equal
        torch.testing.assert_close(icnr.weight[sub::4], icnr.weight[::4], rtol=0, atol=0)
    assert not torch.equal(icnr.weight[0], icnr.weight[4])


def test_adaptive_frequency_filter_is_affnets(backend):
    """AFFNet / AFNO's einsum implementation of the same block."""
    device = _device(backend)
    torch.manual_seed(0)
    layer = ct.AdaptiveFrequencyFilter(8, num_blocks=2, hidden_size_factor=2, sparsity_threshold=0.3,
                                       dtype=F64).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20)  # a mask well away from 0, so soft-shrink does not zero it all
    x = torch.randn(2, 8, 6, 5, dtype=F64, device=device)

    def native(x, p):
        B, C, H, W = x.shape
        X = torch.fft.rfft2(x, norm="ortho")
        z = X.reshape(B, 2, 4, H, W // 2 + 1)
        mm = lambda a, w: torch.einsum("bkihw,kio->bkohw", a, w)  # noqa: E731
        bias = lambda b: b[None, :, :, None, None]  # noqa: E731
        w1, b1, w2, b2 = p["w1"], p["b1"], p["w2"], p["b2"]
        o1r = F.relu(mm(z.real, w1[0]) - mm(z.imag, w1[1]) + bias(b1[0]))
        o1i = F.relu(mm(z.imag, w1[0]) + mm(z.real, w1[1]) + bias(b1[1]))
        o2r = mm(o1r, w2[0]) - mm(o1i, w2[1]) + bias(b2[0])
        o2i = mm(o1i, w2[0]) + mm(o1r, w2[1]) + bias(b2[1])
        mask = torch.view_as_complex(F.softshrink(torch.stack([o2r, o2i], -1), 0.3)).reshape(B, C, H, -1)
        return torch.fft.irfft2(X * mask, s=(H, W), norm="ortho") + x
    mask = layer.mask(x).detach()
    assert (mask.real == 0).any() and (mask.imag == 0).any() and (mask != 0).float().mean() > 0.5  # sparsified
    _compare(layer, native, x)


# ---------------------------------------------------------------------------------------
# AMP, channels_last, torch.compile, training.

class ResBlock(nn.Module):
    """A ResNet basic block whose convolutions are cuconv's: deformable, involution, ODConv."""

    def __init__(self, c):
        super().__init__()
        self.deform = ct.DeformConv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.involution = ct.Involution2d(c, 3, group_channels=4)
        self.odconv = ct.ODConv2d(c, c, 3, padding=1, min_channel=4)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.deform(x)))
        y = F.relu(self.involution(y))
        return F.relu(x + self.bn2(self.odconv(y)))


class Net(nn.Module):
    def __init__(self, c=8, classes=4):
        super().__init__()
        self.stem = ct.Conv2d(3, c, 3, padding=1)
        self.block = ResBlock(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def _model_and_data(seed=0, dtype=torch.float32, device="cpu"):
    """The same model and data (drawn on the CPU) on any device."""
    torch.manual_seed(seed)
    model = Net().to(dtype)
    with torch.no_grad():  # start away from DCN's zero offsets, so the sampling is fractional
        model.block.deform.offset_predictor.weight.normal_(0, 0.1)
    x, labels = torch.randn(6, 3, 8, 8, dtype=dtype), torch.randint(0, 4, (6,))
    return model.to(device), x.to(device), labels.to(device)


def test_small_model_trains(backend):
    model, x, labels = _model_and_data(device=_device(backend))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses


def test_autocast_bfloat16(backend):
    """Under torch.autocast(device, bfloat16) the ops run in bfloat16 (parameters stay
    float32 and get float32 gradients); results are within bfloat16 rounding of float32."""
    device = _device(backend)
    model, x, labels = _model_and_data(device=device)
    model.eval()
    expected = model(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert ct.conv2d(x, model.stem.weight).dtype == torch.bfloat16
        assert ct.pixel_shuffle(x[:, :, :, :4].repeat(1, 4, 1, 1), 2).dtype == torch.float32  # kept, as torch's
        out = model(x)
        loss = F.cross_entropy(out, labels)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in model.parameters() if p.requires_grad)
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert not torch.equal(out.float(), expected)  # it did run in reduced precision
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ct.AdaptiveFrequencyFilter(8, num_blocks=2, device=device)(x.repeat(1, 3, 1, 1)[:, :8].to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_channels_last_inputs(backend):
    device = _device(backend)
    model, x, _ = _model_and_data(dtype=F64, device=device)
    model.eval()
    aff = ct.AdaptiveFrequencyFilter(8, num_blocks=2, dtype=F64, device=device)
    for layer, inp in ((model, x), (aff, torch.randn(2, 8, 6, 6, dtype=F64, device=device))):
        a = inp.clone().requires_grad_()
        b = inp.clone().to(memory_format=torch.channels_last).requires_grad_()
        assert not b.is_contiguous()
        ya, yb = layer(a), layer(b)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


class CompileNet(nn.Module):
    """Every layer once (float64)."""

    def __init__(self):
        super().__init__()
        self.net = Net()
        self.aff = ct.AdaptiveFrequencyFilter(8, num_blocks=2)
        self.sub = ct.SubPixelConv2d(8, 2, 3, padding=1)
        self.unshuffle = ct.PixelUnshuffle(2)
        self.dyn = ct.DynamicConv2d(8, 8, 3, padding=1, num_experts=2)
        self.sep = ct.DepthwiseSeparableConv2d(8, 4, 3, padding=1)
        self.up = ct.ConvTranspose2d(4, 4, 2, stride=2)
        self.shuffle = ct.PixelShuffle(2)

    def forward(self, x):
        y = self.net.block(self.net.stem(x))
        y = self.unshuffle(self.sub(self.aff(y)))
        y = self.shuffle(self.up(self.sep(self.dyn(y))))
        return y


def _eager_and_compiled(model, x, compiler):
    model.eval()
    grads = []
    outs = []
    for run in (model, torch.compile(model, fullgraph=True, backend=compiler)):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    return outs, grads


def test_compile_fullgraph_matches_eager(backend):
    """fullgraph=True (a graph break would raise) through AOTAutograd: the same kernels, so
    output and every gradient are bitwise equal to eager mode."""
    device = _device(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CompileNet().to(F64).to(device)
    (y, yc), (g, gc) = _eager_and_compiled(model, torch.randn(2, 3, 8, 8, dtype=F64).to(device), "aot_eager")
    assert y.shape == (2, 1, 32, 32)
    # On CUDA the traced graph may reach other kernels for torch's own ops (eager batch
    # norm goes to cuDNN); cuconv's kernels are the same either way.
    tol = 0 if backend == "interpret" else 1e-12
    torch.testing.assert_close(yc, y, rtol=tol, atol=tol)
    for a, b in zip(g, gc):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_compile_inductor(backend):
    """The default backend (inductor; Triton kernels on CUDA) compiles the torch code around
    the cuconv ops."""
    device = _device(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(ct.Conv2d(3, 4, 3, padding=1), nn.ReLU(), ct.DeformConv2d(4, 4, 3, padding=1),
                          ct.Involution2d(4, 3, group_channels=2), nn.Tanh()).to(F64).to(device)
    (y, yc), (g, gc) = _eager_and_compiled(model, torch.randn(2, 3, 6, 6, dtype=F64).to(device), "inductor")
    torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, gc):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_layers_are_exported():
    module = ct
    for name in ("Conv2d", "ConvTranspose2d", "DepthwiseSeparableConv2d", "DeformConv2d", "Involution2d",
                 "DynamicConv2d", "ODConv2d", "PixelShuffle", "SubPixelConv2d", "AdaptiveFrequencyFilter", "DCNv3",
                 "DCNv4", *OPS):
        assert name in module.__all__ and hasattr(module, name)


# ---------------------------------------------------------------------------------------
# CUDA only: side streams, a second GPU, CUDA graphs.

# GPU time spun on a stream before its data is written (~25 ms at 2 GHz): work on another
# stream that is not ordered after it runs first and reads the NaN the tensor held.
SPIN_CYCLES = 50_000_000
needs_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2,
                                    reason=f"needs 2 CUDA GPUs (found {torch.cuda.device_count() if CUDA else 0})")


def _cuda0() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_side_stream_gives_the_default_streams_result(op):
    """Inside `with torch.cuda.stream(side)`, every argument non-contiguous and written on
    `side` only after the GPU spun there: forward and backward equal the default stream's
    results bit for bit once the default stream waits for `side`. A contiguous copy, fill
    or kernel of the call on any other stream would read NaN."""
    device = _cuda0()
    arrays, params = op_case(op)
    arrays = {n: a.to(device) for n, a in arrays.items()}
    fn = getattr(ct, op)
    leaves = {n: a.clone().requires_grad_() for n, a in arrays.items()}
    expected = fn(**leaves, **params)
    gy = torch.randn_like(expected)
    expected.backward(gy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # each argument is every other element of a wider tensor: a strided view
        wide = {n: torch.full((*a.shape[:-1], 2 * a.shape[-1]), float("nan"), dtype=a.dtype, device=device)
                for n, a in arrays.items()}
        torch.cuda._sleep(SPIN_CYCLES)
        for n, a in arrays.items():
            wide[n][..., ::2] = a
            wide[n].requires_grad_()
        args = {n: w[..., ::2] for n, w in wide.items()}
        assert not any(a.is_contiguous() for a in args.values())
        y = fn(**args, **params)
        y.backward(gy)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y.detach(), expected.detach(), rtol=0, atol=0)
    for n, w in wide.items():
        torch.testing.assert_close(w.grad[..., ::2], leaves[n].grad, rtol=0, atol=0, msg=f"{op}: gradient of {n}")
        assert not w.grad[..., 1::2].any()


@needs_cuda
def test_cuda_deform_conv2d_layer_on_a_side_stream():
    """DeformConv2d slices its offsets and mask out of the predictor's output (never
    contiguous): forward and backward on a side stream, on an input written there after
    the GPU spun, read on the host after side.synchronize(), equal the default stream's."""
    torch.manual_seed(0)
    layer = ct.DeformConv2d(4, 6, 3, padding=1).to(_cuda0())
    with torch.no_grad():
        layer.offset_predictor.weight.normal_(0, 0.3)
    x = torch.randn(2, 4, 7, 6, device=layer.weight.device)
    gy = torch.randn(2, 6, 7, 6, device=layer.weight.device)

    def run(x):
        layer.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_()
        y = layer(x)
        y.backward(gy)
        return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]

    expected = [t.cpu() for t in run(x)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = torch.full_like(x, float("nan"))
        torch.cuda._sleep(SPIN_CYCLES)
        late.copy_(x)
        got = run(late)
    side.synchronize()
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, msg=f"result {index} (output, input grad, parameters)")


@needs_two_gpus
@pytest.mark.parametrize("op", OPS)
def test_cuda_second_gpu_while_the_first_is_current(op):
    """Tensors on cuda:1 with cuda:0 current: the output and every gradient are on cuda:1
    and equal the cuda:0 results (kernels, copies and outputs all on the tensors' GPU)."""
    arrays, params = op_case(op)
    fn = getattr(ct, op)
    results = []
    for index in (0, 1):
        device = torch.device("cuda", index)
        leaves = {n: a.to(device).requires_grad_() for n, a in arrays.items()}
        with torch.cuda.device(0):
            y = fn(**leaves, **params)
            y.backward(torch.ones_like(y))
        got = [y.detach(), *(leaves[n].grad for n in arrays)]
        assert all(t.device == device for t in got), [t.device for t in got]
        results.append([t.cpu() for t in got])
    for index, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=f"{op}: result {index} (output, gradients)")


@needs_cuda
def test_cuda_graph_capture_of_forward_and_backward():
    """torch.cuda.graph captures a forward + backward through cuconv layers (DeformConv2d's
    non-contiguous offsets, so its contiguous copies, included). Replayed after new data is
    copied into the static input, it gives eager mode's output and gradients: every
    allocation of the capture came from torch's graph pool, on the capture stream."""
    torch.manual_seed(0)
    model = nn.Sequential(ct.Conv2d(3, 4, 3, padding=1), nn.ReLU(), ct.DeformConv2d(4, 4, 3, padding=1),
                          ct.Involution2d(4, 3, group_channels=2), nn.Tanh()).to(_cuda0()).eval()
    with torch.no_grad():
        model[2].offset_predictor.weight.normal_(0, 0.1)
    params = list(model.parameters())
    static_x = torch.randn(2, 3, 6, 6, device=params[0].device, requires_grad=True)

    def step(x):
        y = model(x)
        y.square().sum().backward()
        return y

    # Warm-up on a side stream, as torch asks before a capture (kernels compile and load here).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            static_x.grad = None
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = step(static_x)
    static_grads = [static_x.grad, *(p.grad for p in params)]  # written again by each replay

    for seed in (1, 2):
        new = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(static_x.device)
        with torch.no_grad():
            static_x.copy_(new)
        graph.replay()
        x = new.clone().requires_grad_()
        y = model(x)
        expected = [y, *torch.autograd.grad(y.square().sum(), [x, *params])]  # leaves .grad alone
        for index, (got, want) in enumerate(zip([static_y, *static_grads], expected)):
            torch.testing.assert_close(got.detach(), want.detach(), msg=f"replay {seed}: result {index}")
