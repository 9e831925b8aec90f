"""Higher-order gradients that are right or refused, plain functions that follow their
inputs, and torch's edge-case shapes (unbatched input, zero input channels).

- torch: gradgradcheck (float64) of every registered op on its examples (grouped,
  strided and dilated geometries among them), the gradient-penalty pattern (WGAN-GP, R1)
  against torch-native oracles, deform_conv2d's refusal through its offset, and a
  deliberately broken second-derivative formula that gradgradcheck must catch.
- JAX: grad of grad against lax / jnp oracles; forward mode refused, naming the op.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import cuconv
import cuconv.torch as ct
from cuconv._registry import OPS

F64 = torch.float64
EXAMPLES = [(op, i) for op, opdef in sorted(OPS.items()) for i in range(len(opdef.examples))]


def _arrays(op: str, index: int = 0, seed: int = 0) -> tuple[dict, dict]:
    """(float64 leaves requiring grad, by name; params) of a registered example."""
    opdef, g = OPS[op], torch.Generator().manual_seed(seed)
    example = opdef.examples[index]
    arrays = {}
    for name in opdef.arrays:
        shape = example.shapes[name]
        if shape is None:
            continue
        t = torch.randn(*shape, generator=g, dtype=F64)
        if name in opdef.complex_arrays:
            t = torch.complex(t, torch.randn(*shape, generator=g, dtype=F64))
        arrays[name] = t.requires_grad_()
    return arrays, dict(example.params)


# --- torch: second (and third) order ---

@pytest.mark.parametrize("op,index", EXAMPLES)
def test_gradgradcheck(op, index):
    """Every array the op is affine in is differentiated twice (deform_conv2d: offset fixed)."""
    arrays, params = _arrays(op, index)
    fixed = {n: arrays.pop(n).detach() for n in OPS[op].nonlinear if n in arrays}
    names, fn = list(arrays), getattr(ct, op)
    assert torch.autograd.gradgradcheck(lambda *a: fn(**dict(zip(names, a)), **fixed, **params),
                                        tuple(arrays.values()), fast_mode=True)


@pytest.mark.parametrize("op", ["conv2d", "involution2d", "spectral_filter2d"])
def test_gradgradcheck_full_jacobians(op):
    """The slow (exact-Jacobian) mode on a few ops, and a third-order check on one."""
    arrays, params = _arrays(op)
    names, fn = list(arrays), getattr(ct, op)
    f = lambda *a: fn(**dict(zip(names, a)), **params)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, tuple(arrays.values()))
    if op == "involution2d":
        x, k = arrays["input"], arrays["kernel"]
        (gx,) = torch.autograd.grad(f(x, k).pow(2).sum(), x, create_graph=True)
        (gk,) = torch.autograd.grad(gx.pow(2).sum(), k, create_graph=True)
        third = torch.autograd.grad(gk.sum(), x)[0]
        xs, ks = x.detach().requires_grad_(), k.detach().requires_grad_()
        (gxs,) = torch.autograd.grad(_unfold_involution(xs, ks, **params).pow(2).sum(), xs, create_graph=True)
        (gks,) = torch.autograd.grad(gxs.pow(2).sum(), ks, create_graph=True)
        torch.testing.assert_close(third, torch.autograd.grad(gks.sum(), xs)[0], rtol=1e-10, atol=1e-10)


def _unfold_involution(x, kernel, stride=1, padding=0, dilation=1):
    b, c, h, w = x.shape
    _, groups, kh, kw, ho, wo = kernel.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(b, groups, c // groups, kh * kw, ho, wo)
    return (cols * kernel.view(b, groups, 1, kh * kw, ho, wo)).sum(3).view(b, c, ho, wo)


def _penalty(conv, x, params_list):
    """WGAN-GP / R1: a loss plus the squared input gradient, differentiated w.r.t. the
    parameters."""
    y = conv(x, *params_list)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(y.sum() + g.pow(2).sum(), params_list)


PENALTY_CASES = {
    "conv2d": (lambda x, w, b: ct.conv2d(x, w, b, 2, 1, 1, 2), lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2),
               (2, 4, 9, 8), [(6, 2, 3, 3), (6,)]),
    "conv_transpose2d": (lambda x, w, b: ct.conv_transpose2d(x, w, b, 2, 1, 1, 2, (1, 2)),
                         lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, 2, (1, 2)),
                         (2, 4, 5, 6), [(4, 3, 3, 2), (6,)]),
    "involution2d": (lambda x, k: ct.involution2d(x, k, 2, 1), lambda x, k: _unfold_involution(x, k, 2, 1),
                     (2, 6, 7, 7), [(2, 3, 3, 3, 4, 4)]),
    "dynamic_conv2d": (lambda x, w, a, b: ct.dynamic_conv2d(x, w, a, b, 1, 1, 1, 2),
                       lambda x, w, a, b: _folded_dynamic(x, w, a, b, padding=1, groups=2),
                       (3, 4, 6, 5), [(3, 6, 2, 3, 3), (3, 3), (3, 6)]),
}


def _folded_dynamic(x, w, a, b, padding, groups):
    """The batch-folded grouped conv of CondConv / DY-CNN implementations."""
    batch = x.shape[0]
    mixed = torch.einsum("bk,koiyx->boiyx", a, w).reshape(-1, *w.shape[2:])
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), mixed, None, 1, padding, 1, groups * batch)
    return y.view(batch, -1, *y.shape[2:]) + (a @ b)[:, :, None, None]


@pytest.mark.parametrize("op", sorted(PENALTY_CASES))
def test_gradient_penalty_matches_torch_native(op):
    ours, native, x_shape, shapes = PENALTY_CASES[op]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*x_shape, generator=g, dtype=F64, requires_grad=True)
    params = [torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for s in shapes]
    with warnings.catch_warnings():  # torch warns when a backward has no autograd kernel of its own
        warnings.simplefilter("error", UserWarning)
        got_all = _penalty(ours, x, params)
    for got, want in zip(got_all, _penalty(native, x, params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_deform_double_backward_through_offset_is_refused():
    arrays, params = _arrays("deform_conv2d")
    y = ct.deform_conv2d(**arrays, **params)
    (g,) = torch.autograd.grad(y.pow(2).sum(), arrays["input"], create_graph=True)
    with pytest.raises(ct.HigherOrderGradientError, match=r"deform_conv2d: higher-order gradients through offset"):
        torch.autograd.grad(g.pow(2).sum(), arrays["weight"])


def test_deform_double_backward_with_a_fixed_offset_is_right():
    """Multilinear in input, weight and mask for a fixed offset: the penalty's gradient
    equals the one through torchvision-style sampling written with torch ops (bench's
    oracle)."""
    from bench.deform_conv import torch_deform_conv2d

    arrays, params = _arrays("deform_conv2d")
    offset = arrays.pop("offset").detach()
    x, w, b, m = arrays["input"], arrays["weight"], arrays["bias"], arrays["mask"]
    ours = lambda x, w, m: ct.deform_conv2d(x, offset, w, b, mask=m, **params)  # noqa: E731
    native = lambda x, w, m: torch_deform_conv2d(F, x, offset, w, b, mask=m, **params)  # noqa: E731
    for got, want in zip(_penalty(ours, x, [w, m]), _penalty(native, x, [w, m])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_a_broken_second_derivative_is_caught(monkeypatch):
    """Mutation check: forget to zero the argument in the subtracted term (OP(a) instead
    of OP(a_{i<-0})), and gradgradcheck must fail; restored, it passes."""
    arrays, params = _arrays("conv2d")
    names = list(arrays)
    f = lambda *a: ct.conv2d(**dict(zip(names, a)), **params)  # noqa: E731
    substitute = ct._substitute
    monkeypatch.setattr(ct, "_substitute", lambda arrays, i, value: (
        list(arrays) if not bool(value.any()) else substitute(arrays, i, value)))
    with pytest.raises(GradcheckError):
        torch.autograd.gradgradcheck(f, tuple(arrays.values()), fast_mode=True)
    monkeypatch.setattr(ct, "_substitute", substitute)
    assert torch.autograd.gradgradcheck(f, tuple(arrays.values()), fast_mode=True)


# --- plain functions follow their inputs ---

def test_plain_function_is_differentiable_on_torch_tensors():
    arrays, params = _arrays("conv2d")
    y = cuconv.conv2d(**arrays, **params)
    assert y.grad_fn is not None
    y.sum().backward()
    expected = cuconv.conv2d_backward(torch.ones_like(y), **{n: a.detach() for n, a in arrays.items()}, **params)
    for (name, a), e in zip(arrays.items(), expected):
        torch.testing.assert_close(a.grad, e, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        assert cuconv.conv2d(**arrays, **params).grad_fn is None
    detached = {n: a.detach() for n, a in arrays.items()}
    assert cuconv.conv2d(**detached, **params).grad_fn is None


def test_plain_function_under_jax_transforms():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.standard_normal((2, 4, 7, 6))), jnp.asarray(rng.standard_normal((6, 2, 3, 3)))
    loss = lambda x, w: jnp.sum(cuconv.conv2d(x, w, None, 1, 1, 1, 2) ** 2)  # noqa: E731
    gx = jax.grad(loss)(x, w)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(x, w)), np.asarray(gx))
    y = np.asarray(cuconv.conv2d(np.asarray(x), np.asarray(w), None, 1, 1, 1, 2))
    expected = cuconv.conv2d_backward(2 * y, np.asarray(x), np.asarray(w), None, 1, 1, 1, 2)[0]
    np.testing.assert_allclose(np.asarray(gx), expected, rtol=1e-5, atol=1e-4)
    batched = jax.vmap(lambda xb: cuconv.conv2d(xb[None], w, None, 1, 1, 1, 2)[0])(x)
    np.testing.assert_allclose(np.asarray(batched), y, rtol=1e-5, atol=1e-5)


def test_import_cuconv_needs_neither_torch_nor_jax():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['jax'] = None\n"
            "import numpy as np, cuconv\n"
            "y = cuconv.conv2d(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)))\n"
            "assert y.shape == (1, 3, 3, 3) and float(y[0, 0, 0, 0]) == 18.0\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(_root()))


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


# --- JAX: reverse over reverse; forward mode refused ---

def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


def test_jax_grad_of_grad_matches_lax():
    jax = _jax()
    jnp, lax = jax.numpy, jax.lax
    import cuconv.jax as cj

    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.standard_normal((2, 4, 7, 6))), jnp.asarray(rng.standard_normal((6, 2, 3, 2)))

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, (2, 1), [(1, 1), (1, 1)], rhs_dilation=(1, 2),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2,
                                        precision=lax.Precision.HIGHEST)

    ours = lambda x, w: cj.conv2d(x, w, None, (2, 1), 1, (1, 2), 2)  # noqa: E731

    def penalty(conv):
        def f(w, x):
            g = jax.grad(lambda x: jnp.sum(conv(x, w) ** 2))(x)
            return jnp.sum(jnp.sin(conv(x, w))) + jnp.sum(g ** 2)
        return f

    want = jax.grad(penalty(lax_conv))(w, x)
    for jit in (False, True):
        g = jax.grad(penalty(ours))
        got = (jax.jit(g) if jit else g)(w, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-9)
    hess_rev = jax.jacrev(jax.grad(lambda x: jnp.sum(ours(x, w) ** 3)))(x[:1, :, :3, :3])
    hess_lax = jax.jacrev(jax.grad(lambda x: jnp.sum(lax_conv(x, w) ** 3)))(x[:1, :, :3, :3])
    np.testing.assert_allclose(np.asarray(hess_rev), np.asarray(hess_lax), rtol=1e-9, atol=1e-9)


def test_jax_grad_of_grad_spectral_filter_matches_jnp_fft():
    jax = _jax()
    jnp = jax.numpy
    import cuconv.jax as cj

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 7)))
    f = jnp.asarray(rng.standard_normal((1, 3, 6, 4)) + 1j * rng.standard_normal((1, 3, 6, 4)))
    native = lambda x, f: jnp.fft.irfft2(jnp.fft.rfft2(x, norm="ortho") * f, s=(6, 7), norm="ortho")  # noqa: E731

    def penalty(op):
        return lambda f, x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(op(x, f))))(x) ** 2)

    np.testing.assert_allclose(np.asarray(jax.grad(penalty(cj.spectral_filter2d))(f, x)),
                               np.asarray(jax.grad(penalty(native))(f, x)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", sorted(OPS))
def test_jax_forward_mode_is_refused_naming_the_op(op):
    jax = _jax()
    import cuconv.jax as cj

    arrays, params = _arrays(op)
    xs = {n: jax.numpy.asarray(a.detach().numpy()) for n, a in arrays.items()}
    fn = lambda x: getattr(cj, op)(**{**xs, "input": x}, **params)  # noqa: E731
    with pytest.raises(cj.HigherOrderGradientError, match=rf"cuconv.jax.{op}: forward-mode differentiation"):
        jax.jvp(fn, (xs["input"],), (xs["input"],))


def test_jax_deform_higher_order_is_refused():
    jax = _jax()
    jnp = jax.numpy
    import cuconv.jax as cj

    arrays, params = _arrays("deform_conv2d")
    xs = {n: jnp.asarray(a.detach().numpy()) for n, a in arrays.items()}
    inner = lambda w: jax.grad(lambda x: jnp.sum(cj.deform_conv2d(**{**xs, "input": x, "weight": w}, **params) ** 2))
    with pytest.raises(cj.HigherOrderGradientError, match=r"cuconv.jax.deform_conv2d: higher-order gradients"):
        jax.grad(lambda w: jnp.sum(inner(w)(xs["input"]) ** 2))(xs["weight"])


# --- torch's edge-case shapes ---

def test_unbatched_input_as_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, 8, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=F64, requires_grad=True)
    wt = torch.randn(4, 3, 3, 2, generator=g, dtype=F64, requires_grad=True)
    for ours, native, weight in ((lambda x, w: ct.conv2d(x, w, None, 2, 1, 1, 2),
                                  lambda x, w: F.conv2d(x, w, None, 2, 1, 1, 2), w),
                                 (lambda x, w: ct.conv_transpose2d(x, w, None, 2, 1, 1, 2),
                                  lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, 1, 2), wt)):
        y, e = ours(x, weight), native(x, weight)
        assert y.shape == e.shape and y.dim() == 3
        torch.testing.assert_close(y, e, rtol=1e-12, atol=1e-12)
        gy = torch.randn(e.shape, generator=g, dtype=F64)
        got = torch.autograd.grad(y, (x, weight), gy)
        for a, b in zip(got, torch.autograd.grad(e, (x, weight), gy)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(ours, (x, weight))
    compiled = torch.compile(lambda x, w: ct.conv2d(x, w, None, 2, 1, 1, 2), fullgraph=True)
    torch.testing.assert_close(compiled(x.detach(), w.detach()), F.conv2d(x, w, None, 2, 1, 1, 2).detach())
    nx = x.detach().numpy()
    out = cuconv.conv2d(nx, w.detach().numpy(), None, 2, 1, 1, 2)
    assert isinstance(out, np.ndarray) and out.shape == (6, 5, 4)
    gx, gw, _ = cuconv.conv2d_backward(np.ones(out.shape), nx, w.detach().numpy(), None, 2, 1, 1, 2)
    assert gx.shape == nx.shape and gw.shape == (6, 2, 3, 3)


def test_unbatched_layers_as_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 9, dtype=F64)
    for ours, native in ((ct.Conv2d(3, 4, 3, padding=1, stride=2), torch.nn.Conv2d(3, 4, 3, padding=1, stride=2)),
                         (ct.ConvTranspose2d(3, 4, 3, stride=2), torch.nn.ConvTranspose2d(3, 4, 3, stride=2))):
        native = native.double()
        ours = ours.double()
        ours.load_state_dict(native.state_dict())
        torch.testing.assert_close(ours(x), native(x), rtol=1e-12, atol=1e-12)
    kwargs = dict(output_size=(17, 19))
    torch.testing.assert_close(ours(x, **kwargs), native(x, **kwargs), rtol=1e-12, atol=1e-12)


def test_bad_rank_names_both_accepted_ranks():
    with pytest.raises(ValueError, match=r"conv2d: input must be 4-D .* or 3-D .* got shape \(8, 9\)"):
        cuconv.conv2d(np.ones((8, 9)), np.ones((2, 1, 3, 3)))


@pytest.mark.parametrize("with_bias", [True, False])
def test_zero_input_channels(with_bias):
    """The sum over no channels is 0: the output is the bias broadcast (zeros without
    bias), and the gradients have their arrays' shapes (torch 2.13's CPU conv2d returns
    a [B, 0, Ho, Wo] tensor here instead, and its conv_transpose2d refuses)."""
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(12) if with_bias else None
    x, w = rng.standard_normal((2, 0, 7, 8)), rng.standard_normal((12, 0, 3, 3))
    y = cuconv.conv2d(x, w, bias, 1, 1)
    expected = np.broadcast_to((bias if with_bias else np.zeros(12))[None, :, None, None], (2, 12, 7, 8))
    np.testing.assert_array_equal(y, expected)
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = cuconv.conv2d_backward(gy, x, w, bias, 1, 1)
    assert gx.shape == x.shape and gw.shape == w.shape
    if with_bias:
        np.testing.assert_allclose(gb, gy.sum((0, 2, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match=r"algorithm='depthwise' supports only convolutions with input and output"):
        cuconv.conv2d(x, w, bias, algorithm="depthwise")
    wt = rng.standard_normal((0, 4, 3, 3))
    yt = cuconv.conv_transpose2d(x, wt, None if bias is None else bias[:4], 2, 1)
    np.testing.assert_array_equal(yt, np.broadcast_to((bias[:4] if with_bias else np.zeros(4))[None, :, None, None],
                                                      (2, 4, 13, 15)))
    gx, gw, _ = cuconv.conv_transpose2d_backward(np.ones(yt.shape), x, wt, None, 2, 1)
    assert gx.shape == x.shape and gw.shape == wt.shape
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, w)]
    out = ct.conv2d(*leaves, None if bias is None else torch.tensor(bias), 1, 1)
    out.sum().backward()
    assert out.shape == (2, 12, 7, 8) and leaves[0].grad.shape == x.shape and leaves[1].grad.shape == w.shape
