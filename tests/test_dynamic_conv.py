"""dynamic_conv2d, odconv2d and warehouse_conv2d, forward and every gradient: against the
float64 reference, a torch CPU autograd oracle built as the batch-folded grouped conv (the
official CondConv/ODConv trick: x as [1, B*Cin, H, W], the per-sample kernels as
[B*Cout, Cin/g, kh, kw], groups=B*g), finite differences of the reference, identities
(K=1 == conv2d; ODConv without its optional attentions == dynamic_conv2d; one-slot
warehouse == dynamic_conv2d) and the API contract (batch 0, non-contiguous, dtypes,
determinism, bad inputs). Also proves no per-sample kernel tensor is ever allocated."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import dynamic_conv as dynamic_bench
from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import dynamic_conv as dynamic_module
from cuconv.ops.conv2d import conv2d, conv2d_backward
from cuconv.ops.dynamic_conv import (dynamic_conv2d, dynamic_conv2d_backward, odconv2d, odconv2d_backward,
                                     warehouse_conv2d, warehouse_conv2d_backward)
from cuconv.reference import dynamic_conv as reference
from conftest import (
    assert_all_match, assert_gradients_match_finite_differences, assert_reduced_precision, rel_err, to_backend,
    to_numpy, torch_autograd)

# --- torch oracles: the batch-folded grouped conv, autograd through the aggregation (shared
# with the bench's self-check): torch_dynamic(x, w, a, bias, **params) and so on ---

torch_dynamic = functools.partial(dynamic_bench.torch_dynamic, F)
torch_odconv = functools.partial(dynamic_bench.torch_odconv, F)
torch_warehouse = functools.partial(dynamic_bench.torch_warehouse, F)


# --- random configurations ---

def _geometry(rng, max_k=4):
    """(batch, groups, cin_g, cout_g, kh, kw, H, W, conv params): odd sizes, stride,
    padding (incl. 'same' and 'valid'), dilation, groups."""
    groups = int(rng.choice([1, 1, 2, 3]))
    cin_g, cout_g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    kh, kw = (int(v) for v in rng.integers(1, max_k, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 3, size=2))
    padding = [0, int(rng.integers(0, 3)), tuple(int(v) for v in rng.integers(0, 3, size=2)), "valid", "same"][
        int(rng.integers(0, 5))]
    if padding == "same":
        stride = (1, 1)
    h = int(rng.integers(dilation[0] * (kh - 1) + 1, 10))
    w = int(rng.integers(dilation[1] * (kw - 1) + 1, 10))
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return int(rng.integers(1, 4)), groups, cin_g, cout_g, kh, kw, h, w, params


def random_dynamic_config(seed):
    """(x, weight, attention, bias or None, params)."""
    rng = np.random.default_rng(seed)
    b, g, cin_g, cout_g, kh, kw, h, w, params = _geometry(rng)
    k = int(rng.integers(1, 5))
    bias = rng.standard_normal((k, cout_g * g)) if rng.random() < 0.6 else None
    return (rng.standard_normal((b, cin_g * g, h, w)), rng.standard_normal((k, cout_g * g, cin_g, kh, kw)),
            rng.standard_normal((b, k)), bias, params)


def random_odconv_config(seed):
    """(x, weight, ka, sa, ca, fa, params), each optional attention present or None."""
    rng = np.random.default_rng(seed)
    b, g, cin_g, cout_g, kh, kw, h, w, params = _geometry(rng)
    k = int(rng.integers(1, 5))
    maybe = lambda shape: rng.standard_normal(shape) if rng.random() < 0.6 else None  # noqa: E731
    return (rng.standard_normal((b, cin_g * g, h, w)), rng.standard_normal((k, cout_g * g, cin_g, kh, kw)),
            rng.standard_normal((b, k)), maybe((b, kh, kw)), maybe((b, cin_g * g)), maybe((b, cout_g * g)), params)


def random_warehouse_config(seed):
    """(x, cells, attention, params with kernel_shape): cells that tile the kernel in 1..16 slots."""
    rng = np.random.default_rng(seed)
    b, g, _, _, _, _, _, _, params = _geometry(rng)
    co, ci, ch, cw = (int(v) for v in rng.integers(1, 3, size=4))
    so, sc, sy, sx = (int(v) for v in rng.integers(1, 3, size=4))
    kernel_shape = (co * so * g, ci * sc, ch * sy, cw * sx)
    if params["padding"] == "same" or rng.random() < 0.5:
        params["stride"] = (1, 1)
    d = params["dilation"]
    h = int(rng.integers(d[0] * (kernel_shape[2] - 1) + 1, 11))
    w = int(rng.integers(d[1] * (kernel_shape[3] - 1) + 1, 11))
    n = int(rng.integers(1, 5))
    slots = so * sc * sy * sx * g
    return (rng.standard_normal((b, ci * sc * g, h, w)), rng.standard_normal((n, co, ci, ch, cw)),
            rng.standard_normal((b, slots, n)), dict(params, kernel_shape=kernel_shape))


def _check_all(got, refs, torch_refs, names, tol=1e-10):
    assert_all_match(got, refs, torch_refs, names=names, tol=tol)


def _oracle(fn, arrays, gy, params):
    y, grads = torch_autograd(lambda *t: fn(*t, **params), arrays, gy)
    return [y, *grads]


# --- float64 against the reference and the torch oracle ---

@pytest.mark.parametrize("seed", range(20))
def test_dynamic_matches_reference_and_torch_float64(backend, seed):
    x, w, a, bias, params = random_dynamic_config(seed)
    args = [to_backend(v, backend) for v in (x, w, a, bias)]
    y = dynamic_conv2d(*args, **params)
    y_ref = reference.dynamic_conv2d(x, w, a, bias, **params)
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = dynamic_conv2d_backward(to_backend(gy, backend), *args, **params)
    refs = reference.dynamic_conv2d_backward(gy, x, w, a, bias, **params)
    _check_all([y, *grads], [y_ref, *refs], _oracle(torch_dynamic, (x, w, a, bias), gy, params),
               ("output", "input", "weight", "attention", "bias"))


@pytest.mark.parametrize("seed", range(20))
def test_odconv_matches_reference_and_torch_float64(backend, seed):
    x, w, ka, sa, ca, fa, params = random_odconv_config(seed)
    args = [to_backend(v, backend) for v in (x, w, ka, sa, ca, fa)]
    y = odconv2d(*args, **params)
    y_ref = reference.odconv2d(x, w, ka, sa, ca, fa, **params)
    gy = np.random.default_rng(2000 + seed).standard_normal(y_ref.shape)
    grads = odconv2d_backward(to_backend(gy, backend), *args, **params)
    refs = reference.odconv2d_backward(gy, x, w, ka, sa, ca, fa, **params)
    _check_all([y, *grads], [y_ref, *refs], _oracle(torch_odconv, (x, w, ka, sa, ca, fa), gy, params),
               ("output", "input", "weight", "ka", "sa", "ca", "fa"))


@pytest.mark.parametrize("seed", range(20))
def test_warehouse_matches_reference_and_torch_float64(backend, seed):
    x, cells, att, params = random_warehouse_config(seed)
    args = [to_backend(v, backend) for v in (x, cells, att)]
    y = warehouse_conv2d(*args, **params)
    y_ref = reference.warehouse_conv2d(x, cells, att, **params)
    gy = np.random.default_rng(3000 + seed).standard_normal(y_ref.shape)
    grads = warehouse_conv2d_backward(to_backend(gy, backend), *args, **params)
    refs = reference.warehouse_conv2d_backward(gy, x, cells, att, **params)
    _check_all([y, *grads], [y_ref, *refs], _oracle(torch_warehouse, (x, cells, att), gy, params),
               ("output", "input", "cells", "attention"))


def test_torch_tensors_in_torch_tensors_out():
    cases = [(dynamic_conv2d, dynamic_conv2d_backward, torch_dynamic, random_dynamic_config(100)),
             (odconv2d, odconv2d_backward, torch_odconv, random_odconv_config(100)),
             (warehouse_conv2d, warehouse_conv2d_backward, torch_warehouse, random_warehouse_config(100))]
    for op, op_backward, oracle, (*arrays, params) in cases:
        targs = [None if a is None else torch.tensor(a) for a in arrays]
        y = op(*targs, **params)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
        gy = np.random.default_rng(0).standard_normal(tuple(y.shape))
        grads = op_backward(torch.tensor(gy), *targs, **params)
        assert all(g is None or isinstance(g, torch.Tensor) for g in grads)
        expected = _oracle(oracle, arrays, gy, params)
        _check_all([y, *grads], expected, expected, ("output",) + tuple(range(len(grads))))


def test_finite_differences_of_the_reference():
    """The references' backward is the derivative of their forward."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 6, 5))
    cases = [
        (reference.dynamic_conv2d, reference.dynamic_conv2d_backward,
         [x, rng.standard_normal((3, 4, 2, 3, 2)), rng.standard_normal((2, 3)), rng.standard_normal((3, 4))],
         dict(stride=(2, 1), padding=1, groups=2)),
        (reference.odconv2d, reference.odconv2d_backward,
         [x, rng.standard_normal((2, 6, 4, 2, 3)), rng.standard_normal((2, 2)), rng.standard_normal((2, 2, 3)),
          rng.standard_normal((2, 4)), rng.standard_normal((2, 6))], dict(padding="same", dilation=(1, 2))),
        (reference.warehouse_conv2d, reference.warehouse_conv2d_backward,
         [x, rng.standard_normal((3, 2, 2, 1, 3)), rng.standard_normal((2, 8, 3))],
         dict(padding=(1, 0), kernel_shape=(4, 4, 2, 3))),
    ]
    for fwd, bwd, args, params in cases:
        assert_gradients_match_finite_differences(fwd, bwd, args, params, rng, samples=5)


# --- identities ---

def test_dynamic_with_one_kernel_is_conv2d(backend):
    rng = np.random.default_rng(5)
    x, w, bias = rng.standard_normal((3, 6, 9, 8)), rng.standard_normal((1, 4, 3, 3, 2)), rng.standard_normal((1, 4))
    params = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2)
    args = [to_backend(v, backend) for v in (x, w, np.ones((3, 1)), bias)]
    y = dynamic_conv2d(*args, **params)
    y_conv = conv2d(to_backend(x, backend), to_backend(w[0], backend), to_backend(bias[0], backend), **params)
    assert rel_err(y, to_numpy(y_conv)) < 1e-12
    gy = rng.standard_normal(y.shape)
    gx, gw, _, gb = dynamic_conv2d_backward(to_backend(gy, backend), *args, **params)
    cx, cw, cb = conv2d_backward(to_backend(gy, backend), to_backend(x, backend), to_backend(w[0], backend),
                                 to_backend(bias[0], backend), **params)
    assert rel_err(gx, to_numpy(cx)) < 1e-12
    assert rel_err(to_numpy(gw)[0], to_numpy(cw)) < 1e-12
    assert rel_err(to_numpy(gb)[0], to_numpy(cb)) < 1e-12


def test_odconv_without_optional_attentions_is_dynamic_without_bias(backend):
    x, w, a, _, params = random_dynamic_config(7)
    args = [to_backend(v, backend) for v in (x, w, a)]
    y = odconv2d(*args, **params)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(dynamic_conv2d(*args, **params)))
    gy = to_backend(np.random.default_rng(0).standard_normal(to_numpy(y).shape), backend)
    od = odconv2d_backward(gy, *args, **params)
    dyn = dynamic_conv2d_backward(gy, *args, **params)
    assert od[3:] == (None, None, None) and dyn[3] is None
    for g_od, g_dyn in zip(od[:3], dyn[:3]):
        np.testing.assert_array_equal(to_numpy(g_od), to_numpy(g_dyn))


def test_one_slot_warehouse_is_dynamic_without_bias(backend):
    x, w, a, _, params = random_dynamic_config(9)
    args = [to_backend(v, backend) for v in (x, w, a[:, None, :])]
    wh_params = dict(params, kernel_shape=w.shape[1:])
    y = warehouse_conv2d(*args, **wh_params)
    dyn_args = [to_backend(v, backend) for v in (x, w, a)]
    assert rel_err(y, to_numpy(dynamic_conv2d(*dyn_args, **params))) < 1e-12
    gy = to_backend(np.random.default_rng(0).standard_normal(to_numpy(y).shape), backend)
    gx, gc, ga = warehouse_conv2d_backward(gy, *args, **wh_params)
    dx, dw, da, _ = dynamic_conv2d_backward(gy, *dyn_args, **params)
    assert rel_err(gx, to_numpy(dx)) < 1e-12 and rel_err(gc, to_numpy(dw)) < 1e-12
    assert rel_err(to_numpy(ga)[:, 0], to_numpy(da)) < 1e-12


# --- reduced precision: within 2x torch's error (DESIGN.md §5) ---

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reduced_precision_within_twice_torch(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8))
    w = rng.standard_normal((3, 4, 3, 3, 3)) / 3
    a, bias = rng.random((2, 3)), rng.standard_normal((3, 4))
    params = dict(padding=1, groups=2)
    assert_reduced_precision(dynamic_conv2d, dynamic_conv2d_backward, reference.dynamic_conv2d,
                             reference.dynamic_conv2d_backward, lambda *t: torch_dynamic(*t, **params),
                             [x, w, a, bias], params, dtype)
    od = [x, w, a, rng.random((2, 3, 3)), rng.random((2, 6)), rng.random((2, 4))]
    params = dict(stride=2, padding=(1, 0), groups=2)
    assert_reduced_precision(odconv2d, odconv2d_backward, reference.odconv2d, reference.odconv2d_backward,
                             lambda *t: torch_odconv(*t, **params), od, params, dtype, seed=1)
    params = dict(padding="same", kernel_shape=(4, 6, 3, 3))
    wh = [x, rng.standard_normal((4, 2, 3, 3, 3)) / 3, rng.random((2, 2 * 2, 4))]
    assert_reduced_precision(warehouse_conv2d, warehouse_conv2d_backward, reference.warehouse_conv2d,
                             reference.warehouse_conv2d_backward, lambda *t: torch_warehouse(*t, **params), wh,
                             params, dtype, seed=2)


# --- API contract ---

def test_batch_zero(backend):
    x, w, a, bias = np.zeros((0, 4, 7, 6)), np.ones((2, 6, 2, 3, 3)), np.zeros((0, 2)), np.ones((2, 6))
    args = [to_backend(v, backend) for v in (x, w, a, bias)]
    y = dynamic_conv2d(*args, padding=1, groups=2)
    assert to_numpy(y).shape == (0, 6, 7, 6)
    gx, gw, ga, gb = dynamic_conv2d_backward(to_backend(np.zeros((0, 6, 7, 6)), backend), *args, padding=1, groups=2)
    assert to_numpy(gx).shape == (0, 4, 7, 6) and to_numpy(ga).shape == (0, 2)
    assert not to_numpy(gw).any() and to_numpy(gw).shape == w.shape and not to_numpy(gb).any()
    od = [to_backend(v, backend) for v in (x, w, a, np.zeros((0, 3, 3)), np.zeros((0, 4)), np.zeros((0, 6)))]
    assert to_numpy(odconv2d(*od, padding=1, groups=2)).shape == (0, 6, 7, 6)
    grads = odconv2d_backward(to_backend(np.zeros((0, 6, 7, 6)), backend), *od, padding=1, groups=2)
    assert [to_numpy(g).shape for g in grads] == [(0, 4, 7, 6), w.shape, (0, 2), (0, 3, 3), (0, 4), (0, 6)]
    assert not to_numpy(grads[1]).any()
    wh = [to_backend(v, backend) for v in (x, np.ones((2, 3, 2, 3, 3)), np.zeros((0, 2, 2)))]
    assert to_numpy(warehouse_conv2d(*wh, padding=1, groups=2, kernel_shape=(6, 2, 3, 3))).shape == (0, 6, 7, 6)
    grads = warehouse_conv2d_backward(to_backend(np.zeros((0, 6, 7, 6)), backend), *wh, padding=1, groups=2,
                                      kernel_shape=(6, 2, 3, 3))
    assert [to_numpy(g).shape for g in grads] == [(0, 4, 7, 6), (2, 3, 2, 3, 3), (0, 2, 2)]


def test_non_contiguous_inputs():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 8, 9, 4)).transpose(0, 3, 1, 2)  # [2, 4, 8, 9], channels-last strides
    w = rng.standard_normal((3, 5, 4, 3, 3)).transpose(0, 1, 2, 4, 3)
    a = rng.standard_normal((3, 2)).T
    sa, ca = rng.standard_normal((2, 3, 3))[:, ::-1], rng.standard_normal((4, 2)).T
    fa = rng.standard_normal((2, 10))[:, ::2]
    args = (x, w, a, sa, ca, fa)
    assert not any(v.flags.c_contiguous for v in args)
    y = odconv2d(*args, padding=1)
    assert rel_err(y, reference.odconv2d(*args, padding=1)) < 1e-10
    gy = rng.standard_normal((2, 5, 8, 9))[:, :, :, ::-1]
    for g, r in zip(odconv2d_backward(gy, *args, padding=1), reference.odconv2d_backward(gy, *args, padding=1)):
        assert rel_err(g, r) < 1e-10
    t = [torch.tensor(np.ascontiguousarray(v)) for v in (x, w, a)]
    tx = t[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last torch tensor
    y = dynamic_conv2d(tx, t[1], t[2], padding="same")
    assert isinstance(y, torch.Tensor) and rel_err(y, reference.dynamic_conv2d(x, w, a, padding="same")) < 1e-10


def test_nan_and_inf_propagate(backend):
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 5, 5] = np.inf
    y = to_numpy(dynamic_conv2d(to_backend(x, backend), to_backend(np.ones((2, 1, 2, 3, 3)), backend),
                                to_backend(np.full((1, 2), 0.5), backend), padding=1))
    assert np.isnan(y[0, 0, 1:4, 2:5]).all() and np.isinf(y[0, 0, 4:, 4:]).all() and np.isfinite(y[0, 0, :1]).all()


def test_backward_is_bitwise_deterministic(backend, monkeypatch):
    """Two backward calls give the same bits, also with a grid smaller than the work
    (every block walks several items) and weights staged in several chunks."""
    monkeypatch.setattr(_common, "_MAX_GRID", 5)
    monkeypatch.setattr(dynamic_module, "_WEIGHT_STAGE_BYTES", 7 * 4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 10, 9)).astype(np.float32)
    w = rng.standard_normal((3, 4, 3, 3, 3)).astype(np.float32)
    ka, sa = rng.random((3, 3)).astype(np.float32), rng.random((3, 3, 3)).astype(np.float32)
    ca, fa = rng.random((3, 6)).astype(np.float32), rng.random((3, 4)).astype(np.float32)
    args = [to_backend(v, backend) for v in (x, w, ka, sa, ca, fa)]
    gy = to_backend(rng.standard_normal((3, 4, 10, 9)).astype(np.float32), backend)
    first, second = ([to_numpy(g) for g in odconv2d_backward(gy, *args, padding=1, groups=2)] for _ in range(2))
    for g1, g2 in zip(first, second):
        assert g1.tobytes() == g2.tobytes()
    refs = reference.odconv2d_backward(to_numpy(gy), x, w, ka, sa, ca, fa, padding=1, groups=2)
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(first, refs))


def test_many_cells_and_taps_take_several_passes(backend):
    """n > DYN_ACC cells and kh*kw > DYN_ACC taps: the multi-pass reductions."""
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((2, 3, 8, 9)), rng.standard_normal((11, 2, 3, 3, 4))
    ka, sa, fa = rng.standard_normal((2, 11)), rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 2))
    args = [to_backend(v, backend) for v in (x, w, ka, sa, None, fa)]
    gy = rng.standard_normal((2, 2, 8, 9))
    grads = odconv2d_backward(to_backend(gy, backend), *args, padding="same")
    refs = reference.odconv2d_backward(gy, x, w, ka, sa, None, fa, padding="same")
    _check_all(grads, refs, refs, ("input", "weight", "ka", "sa", "ca", "fa"))
    cells, att = rng.standard_normal((10, 1, 3, 3, 2)), rng.standard_normal((2, 4, 10))
    args = [to_backend(v, backend) for v in (x, cells, att)]
    gy = rng.standard_normal((2, 2, 8, 10))
    grads = warehouse_conv2d_backward(to_backend(gy, backend), *args, padding=(1, 2), kernel_shape=(2, 3, 3, 4))
    refs = reference.warehouse_conv2d_backward(gy, x, cells, att, padding=(1, 2), kernel_shape=(2, 3, 3, 4))
    _check_all(grads, refs, refs, ("input", "cells", "attention"))


def test_many_kernels_with_bias(backend):
    """K > DYN_ACC with a bias: the bias gradient's and the attention's later passes."""
    rng = np.random.default_rng(13)
    x, w, a, bias = (rng.standard_normal(s) for s in ((3, 2, 7, 6), (19, 3, 2, 3, 2), (3, 19), (19, 3)))
    args = [to_backend(v, backend) for v in (x, w, a, bias)]
    y = dynamic_conv2d(*args, padding=(1, 0))
    assert rel_err(y, reference.dynamic_conv2d(x, w, a, bias, padding=(1, 0))) < 1e-10
    gy = rng.standard_normal(to_numpy(y).shape)
    grads = dynamic_conv2d_backward(to_backend(gy, backend), *args, padding=(1, 0))
    refs = reference.dynamic_conv2d_backward(gy, x, w, a, bias, padding=(1, 0))
    _check_all(grads, refs, refs, ("input", "weight", "attention", "bias"))


def test_planes_wider_than_one_block(backend):
    """More than 256 pixels per plane: several pixel tiles, so every workspace holds
    several partials per row (the attention, filter, spatial and channel gradients)."""
    rng = np.random.default_rng(14)
    x, w = rng.standard_normal((2, 2, 18, 19)), rng.standard_normal((2, 3, 2, 2, 2))
    ka, sa, ca, fa = (rng.standard_normal(s) for s in ((2, 2), (2, 2, 2), (2, 2), (2, 3)))
    args = [to_backend(v, backend) for v in (x, w, ka, sa, ca, fa)]
    y = odconv2d(*args)
    assert to_numpy(y).shape == (2, 3, 17, 18)  # 306 pixels: two tiles of 256
    gy = rng.standard_normal(to_numpy(y).shape)
    grads = odconv2d_backward(to_backend(gy, backend), *args)
    refs = reference.odconv2d_backward(gy, x, w, ka, sa, ca, fa)
    _check_all(grads, refs, refs, ("input", "weight", "ka", "sa", "ca", "fa"))
    cells, att = rng.standard_normal((3, 3, 1, 1, 2)), rng.standard_normal((2, 4, 3))
    args = [to_backend(v, backend) for v in (x, cells, att)]
    grads = warehouse_conv2d_backward(to_backend(gy, backend), *args, kernel_shape=(3, 2, 2, 2))
    refs = reference.warehouse_conv2d_backward(gy, x, cells, att, kernel_shape=(3, 2, 2, 2))
    _check_all(grads, refs, refs, ("input", "cells", "attention"))


def test_wrt_subsets(backend):
    x, w, ka, sa, ca, fa, params = random_odconv_config(4)
    ka, sa, ca, fa = ka, np.ones(x.shape[:1] + w.shape[3:]), np.ones(x.shape[:2]), np.ones((x.shape[0], w.shape[1]))
    args = [to_backend(v, backend) for v in (x, w, ka, sa, ca, fa)]
    gy = to_backend(np.random.default_rng(0).standard_normal(reference.odconv2d(x, w, ka, **params).shape), backend)
    full = [to_numpy(g) for g in odconv2d_backward(gy, *args, **params)]
    names = ("input", "weight", "kernel_attention", "spatial_attention", "channel_attention", "filter_attention")
    for i, name in enumerate(names):
        grads = odconv2d_backward(gy, *args, **params, wrt=name)
        assert all(g is None for j, g in enumerate(grads) if j != i), name
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])
    assert odconv2d_backward(gy, *args[:3], **params, wrt=("spatial_attention",)) == (None,) * 6
    x, w, a, bias, params = random_dynamic_config(1)
    bias = np.ones((w.shape[0], w.shape[1]))
    args = [to_backend(v, backend) for v in (x, w, a, bias)]
    gy = to_backend(np.ones(reference.dynamic_conv2d(x, w, a, **params).shape), backend)
    full = [to_numpy(g) for g in dynamic_conv2d_backward(gy, *args, **params)]
    for i, name in enumerate(("input", "weight", "attention", "bias")):
        grads = dynamic_conv2d_backward(gy, *args, **params, wrt=(name,))
        assert all(g is None for j, g in enumerate(grads) if j != i), name
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])


# --- no per-sample kernel anywhere ---

def test_no_per_sample_kernels_are_allocated(launches):
    """B x Cout x Cin/g x kh x kw is the largest array the naive method would make here;
    cuconv allocates nothing that large, forward or backward (workspaces included)."""
    rng = np.random.default_rng(2)
    b, cin, cout, k = 8, 16, 16, 3
    x, w = rng.standard_normal((b, cin, 6, 6)), rng.standard_normal((2, cout, cin, k, k))
    ka, sa, ca, fa = rng.random((b, 2)), rng.random((b, k, k)), rng.random((b, cin)), rng.random((b, cout))
    bias = rng.standard_normal((2, cout))
    per_sample = b * cout * cin * k * k
    with _arrays.track_allocations() as log:
        y = dynamic_conv2d(x, w, ka, bias, padding=1)
        grads = dynamic_conv2d_backward(np.ones(y.shape), x, w, ka, bias, padding=1)
        y2 = odconv2d(x, w, ka, sa, ca, fa, padding=1)
        grads2 = odconv2d_backward(np.ones(y2.shape), x, w, ka, sa, ca, fa, padding=1)
        cells, att = rng.standard_normal((3, 8, 4, 3, 3)), rng.random((b, 2 * 4, 3))
        y3 = warehouse_conv2d(x, cells, att, padding=1, kernel_shape=(cout, cin, k, k))
        grads3 = warehouse_conv2d_backward(np.ones(y3.shape), x, cells, att, padding=1, kernel_shape=(cout, cin, k, k))
    sizes = [int(np.prod(shape)) for shape, _ in log]
    # the largest legitimate arrays: x, y and their gradients (8*16*36) and the K = 2 kernel bank's gradient
    assert max(sizes) == 2 * cout * cin * k * k == b * cin * 36 < per_sample / 2, sorted(sizes)
    assert (y.shape, "float64") == log[0] and len(launches) > 10
    assert all(g is not None for g in (*grads, *grads2, *grads3))


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 4, 8, 8))
W = _rng.standard_normal((3, 6, 2, 3, 3))
A = _rng.standard_normal((2, 3))
BIAS = _rng.standard_normal((3, 6))
SA, CA, FA = _rng.standard_normal((2, 3, 3)), _rng.standard_normal((2, 4)), _rng.standard_normal((2, 6))
CELLS = _rng.standard_normal((5, 3, 1, 3, 3))
ATT = _rng.standard_normal((2, 4, 5))
KS = (6, 2, 3, 3)

BAD_DYNAMIC = [
    ("input 3-D", (X[0], W, A), {}, ValueError, r"input must be 4-D .*\(4, 8, 8\)"),
    ("weight 4-D", (X, W[0], A), {}, ValueError, r"weight must be 5-D \[K, out_channels.*got shape \(6, 2, 3, 3\)"),
    ("groups mismatch", (X, W, A), dict(groups=1), ValueError, r"input has 4 channels but weight expects"),
    ("attention batch", (X, W, A[:1]), dict(groups=2), ValueError,
     r"attention must have shape \(2, 3\), got \(1, 3\) \(.*input \(2, 4, 8, 8\), weight \(3, 6, 2, 3, 3\)"),
    ("attention K", (X, W, A[:, :2]), dict(groups=2), ValueError, r"attention must have shape \(2, 3\), got \(2, 2\)"),
    ("bias shape", (X, W, A, BIAS[0]), dict(groups=2), ValueError, r"bias must have shape \(3, 6\), got \(6,\)"),
    ("no kernels", (X, W[:0], A[:, :0]), dict(groups=2), ValueError, r"weight has no kernels"),
    ("negative padding", (X, W, A), dict(groups=2, padding=-1), ValueError, r"padding must be >= 0"),
    ("same with stride", (X, W, A), dict(groups=2, padding="same", stride=2), ValueError, r"requires stride 1"),
    ("kernel larger than input", (X, _rng.standard_normal((3, 6, 2, 9, 3)), A), dict(groups=2), ValueError,
     r"larger than the padded input 8x8"),
    ("mixed dtypes", (X, W, A.astype(np.float32)), dict(groups=2), TypeError, r"one dtype; got .*attention float32"),
    ("attention None", (X, W, None), dict(groups=2), TypeError, r"attention must be an array, got None"),
    ("not an array", (X, W.tolist(), A), dict(groups=2), TypeError, r"weight must be an array"),
]

BAD_ODCONV = [
    ("weight 6-D", (X, W[None], A), dict(groups=2), ValueError, r"weight must be 5-D"),
    ("kernel_attention shape", (X, W, A.T), dict(groups=2), ValueError,
     r"kernel_attention must have shape \(2, 3\), got \(3, 2\)"),
    ("spatial_attention shape", (X, W, A, SA[:, :2]), dict(groups=2), ValueError,
     r"spatial_attention must have shape \(2, 3, 3\), got \(2, 2, 3\)"),
    ("channel_attention shape", (X, W, A, None, CA[:, :3]), dict(groups=2), ValueError,
     r"channel_attention must have shape \(2, 4\), got \(2, 3\)"),
    ("filter_attention shape", (X, W, A, SA, CA, FA[:, :, None]), dict(groups=2), ValueError,
     r"filter_attention must have shape \(2, 6\), got \(2, 6, 1\)"),
    ("zero dilation", (X, W, A), dict(groups=2, dilation=0), ValueError, r"dilation must be positive"),
    ("mixed dtypes", (X, W, A, SA.astype(np.float16)), dict(groups=2), TypeError, r"spatial_attention float16"),
    ("kernel_attention None", (X, W, None), dict(groups=2), TypeError, r"kernel_attention must be an array"),
]

BAD_WAREHOUSE = [
    ("cells 4-D", (X, CELLS[0], ATT), dict(groups=2, kernel_shape=KS), ValueError, r"cells must be 5-D"),
    ("kernel_shape missing", (X, CELLS, ATT), dict(groups=2), TypeError, r"kernel_shape=.* is required"),
    ("kernel_shape 3 ints", (X, CELLS, ATT), dict(groups=2, kernel_shape=(6, 2, 3)), TypeError,
     r"kernel_shape must be a tuple of 4 ints"),
    ("kernel_shape not tiled", (X, CELLS, ATT), dict(groups=2, kernel_shape=(6, 2, 4, 3)), ValueError,
     r"cells of shape \(3, 1, 3, 3\) do not tile kernel_shape \(6, 2, 4, 3\)"),
    ("groups mismatch", (X, CELLS, ATT), dict(groups=1, kernel_shape=KS), ValueError,
     r"input has 4 channels but kernel_shape expects in_channels/groups=2 x groups=1 = 2"),
    ("groups do not divide out_channels", (X[:, :2], CELLS[:, :1], ATT[:, :3]),
     dict(groups=2, kernel_shape=(3, 1, 3, 3)), ValueError, r"kernel_shape's out_channels=3 is not divisible by groups=2"),
    ("attention slots", (X, CELLS, ATT[:, :3]), dict(groups=2, kernel_shape=KS), ValueError,
     r"attention must have shape \(2, 4, 5\), got \(2, 3, 5\)"),
    ("attention cells", (X, CELLS, ATT[..., :4]), dict(groups=2, kernel_shape=KS), ValueError,
     r"attention must have shape \(2, 4, 5\), got \(2, 4, 4\)"),
    ("empty cell", (X, CELLS[:, :0], ATT), dict(groups=2, kernel_shape=KS), ValueError, r"cells has an empty"),
    ("integer dtype", (X.astype(np.int64), CELLS, ATT), dict(kernel_shape=KS), TypeError, r"input has dtype int64"),
]


def _backward_gy():
    return np.ones((2, 6, 6, 6))


@pytest.mark.parametrize("case", BAD_DYNAMIC, ids=[c[0] for c in BAD_DYNAMIC])
def test_bad_dynamic_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        dynamic_conv2d(*args, **params)
    with pytest.raises(error, match=pattern):
        dynamic_conv2d_backward(_backward_gy(), *args, **params)
    assert launches == []


@pytest.mark.parametrize("case", BAD_ODCONV, ids=[c[0] for c in BAD_ODCONV])
def test_bad_odconv_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        odconv2d(*args, **params)
    with pytest.raises(error, match=pattern):
        odconv2d_backward(_backward_gy(), *args, **params)
    assert launches == []


@pytest.mark.parametrize("case", BAD_WAREHOUSE, ids=[c[0] for c in BAD_WAREHOUSE])
def test_bad_warehouse_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        warehouse_conv2d(*args, **params)
    with pytest.raises(error, match=pattern):
        warehouse_conv2d_backward(_backward_gy(), *args, **params)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    gy = _backward_gy()
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 6, 6, 6\)"):
        dynamic_conv2d_backward(gy[:, :5], X, W, A, groups=2)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['cells'\]"):
        dynamic_conv2d_backward(gy, X, W, A, groups=2, wrt="cells")
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['bias'\]"):
        odconv2d_backward(gy, X, W, A, groups=2, wrt=("input", "bias"))
    with pytest.raises(TypeError, match=r"grad_output float32"):
        warehouse_conv2d_backward(gy.astype(np.float32), X, CELLS, ATT, groups=2, kernel_shape=KS)
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture would notice a launch (so its empty lists mean something)."""
    dynamic_conv2d(X, W, A, groups=2)
    odconv2d(X, W, A, groups=2)
    warehouse_conv2d(X, CELLS, ATT, groups=2, kernel_shape=KS)
    assert launches == ["dynamic_conv2d_fwd"] * 3
