"""dynamic_conv2d(..., algorithm='implicit_gemm'): the forward and the input gradient on the
tensor-core implicit GEMM with sample b's kernel mixed in the B-tile loader
(kernels_cu/conv2d_igemm.cu, conv2d_igemm_dynamic_fwd / _bwd_input; launchers in
cuconv/ops/conv2d_igemm.py).

Accuracy (design §2): against the float64 reference, within twice the error of an anchor
that is torch CPU in the same dtype computing the batch-folded grouped conv with the mixed
kernel rounded to the dtype (mixed = einsum(att, W) in float64, then .to(dtype)): the
kernels round the mixture once to the storage type, as a user materialising it would.
Also: agreement with algorithm='direct', the non-input gradients bitwise those of 'direct',
batch 0 / 1, determinism, no mixed-kernel-sized allocation, and bad arguments launching
nothing."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops._common import Call
from cuconv.ops.conv2d import conv_geometry
from cuconv.ops.conv2d_igemm import (KERNELS, dynamic_implicit_gemm_supported, launch_igemm_dynamic_forward,
                                     launch_igemm_dynamic_grad_input)
from cuconv.ops.dynamic_conv import dynamic_conv2d, dynamic_conv2d_backward, odconv2d
from cuconv.reference import dynamic_conv as reference
from conftest import DTYPES, rel_err, to_backend, to_numpy, unit_roundoff, within_twice_anchor

HALF_DTYPES = ["float16", "bfloat16"]
IGEMM = dict(algorithm="implicit_gemm")
DIRECT = dict(algorithm="direct")


def as64(a):
    return None if a is None else np.asarray(a, np.float64)


# --- the anchor: torch CPU in the dtype, mixed kernel materialised and rounded to it ---

def torch_anchor(x, w, a, bias, gy, dtype, stride=1, padding=0, dilation=1, groups=1):
    """(y, grad_input) as float64 NumPy: the batch-folded grouped F.conv2d in `dtype` with
    the per-sample kernels einsum(att, W) computed in float64 and rounded to `dtype`."""
    tdtype = getattr(torch, dtype)
    mixed = torch.einsum("bk,koiyx->boiyx", torch.tensor(as64(a)), torch.tensor(as64(w))).to(tdtype)
    b, cin, h, wd = x.shape
    cout = mixed.shape[1]
    tx = torch.tensor(as64(x)).to(tdtype).requires_grad_(True)
    y = F.conv2d(tx.reshape(1, b * cin, h, wd), mixed.reshape(b * cout, *mixed.shape[2:]), None, stride=stride,
                 padding=padding, dilation=dilation, groups=b * groups)
    y = y.reshape(b, cout, *y.shape[2:])
    if bias is not None:
        y = y + (torch.tensor(as64(a)).to(tdtype) @ torch.tensor(as64(bias)).to(tdtype))[:, :, None, None]
    y.backward(torch.tensor(as64(gy)).to(tdtype))
    return y.detach().double().numpy(), tx.grad.double().numpy()


# (B, G, Cin_g, Cout_g, K, kh, kw, H, W, params, bias)
CASES = [
    (2, 1, 5, 6, 3, 3, 3, 9, 8, dict(padding=1), True),                     # K 3, groups 1
    (2, 2, 3, 4, 4, 3, 3, 7, 9, dict(stride=2, padding=1, groups=2), False),  # K 4, groups 2, dgrad phases
    (1, 1, 4, 70, 1, 2, 3, 6, 7, dict(stride=(2, 1), padding=(1, 0)), True),  # K 1, batch 1, two N tiles
    (3, 2, 6, 3, 3, 3, 3, 8, 8, dict(stride=2, dilation=2, padding=2, groups=2), True),  # phases without taps
    (2, 1, 12, 5, 2, 3, 3, 9, 9, dict(padding="same"), False),               # K (fwd) 108: 4 BK steps
]


def make_inputs(case, dtype, seed=0):
    b, g, cin_g, cout_g, k, kh, kw, h, w_, params, with_bias = case
    rng = np.random.default_rng(seed + 17 * b + cin_g * cout_g + k)
    t = DTYPES[dtype]
    x = rng.standard_normal((b, g * cin_g, h, w_)).astype(t)
    w = (rng.standard_normal((k, g * cout_g, cin_g, kh, kw)) / np.sqrt(k)).astype(t)
    a = rng.random((b, k)).astype(t)
    bias = rng.standard_normal((k, g * cout_g)).astype(t) if with_bias else None
    y_shape = reference.dynamic_conv2d(as64(x[:1]), as64(w), as64(a[:1]), None, **params).shape[1:]
    gy = rng.standard_normal((b, *y_shape)).astype(t)
    return x, w, a, bias, gy, params


def case_id(case):
    b, g, cin_g, cout_g, k, kh, kw, h, w_, _, with_bias = case
    return f"B{b}-G{g}-{cin_g}to{cout_g}-K{k}-{kh}x{kw}-{h}x{w_}" + ("-bias" if with_bias else "")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_input_gradient_within_twice_the_anchor(backend, dtype, case):
    x, w, a, bias, gy, params = make_inputs(case, dtype)
    y_ref = reference.dynamic_conv2d(as64(x), as64(w), as64(a), as64(bias), **params)
    gx_ref = reference.dynamic_conv2d_backward(as64(gy), as64(x), as64(w), as64(a), as64(bias), **params)[0]
    y_anchor, gx_anchor = torch_anchor(x, w, a, bias, gy, dtype, **params)
    dev = [to_backend(v, backend) for v in (x, w, a, bias)]
    y = to_numpy(dynamic_conv2d(*dev, **params, **IGEMM))
    gx = to_numpy(dynamic_conv2d_backward(to_backend(gy, backend), *dev, **params, wrt="input", **IGEMM)[0])
    for name, got, anchor, ref in (("output", y, y_anchor, y_ref), ("input", gx, gx_anchor, gx_ref)):
        assert got.dtype == DTYPES[dtype] and got.shape == ref.shape, name
        assert not np.isnan(got.astype(np.float64)).any(), name  # CUCONV_POISON: every element written
        assert within_twice_anchor(got, anchor, ref, dtype), (name, rel_err(got, ref), rel_err(anchor, ref))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_close_to_the_direct_kernels_and_other_gradients_bitwise(dtype, launches):
    """Both accumulate in float32; the tensor-core path also rounds the mixed kernel to the
    dtype, so the results differ by a few units of the dtype. The weight / attention / bias
    gradients are the direct kernels' own, bitwise."""
    x, w, a, bias, gy, params = make_inputs(CASES[1][:10] + (True,), dtype, seed=3)
    u = unit_roundoff(dtype)
    y, y_direct = (dynamic_conv2d(x, w, a, bias, **params, **alg) for alg in (IGEMM, DIRECT))
    assert rel_err(y, as64(y_direct)) <= 4 * u
    launches.clear()
    grads = dynamic_conv2d_backward(gy, x, w, a, bias, **params, **IGEMM)
    assert launches[0] == "conv2d_igemm_dynamic_bwd_input" and "dynamic_conv2d_bwd_input" not in launches
    direct = dynamic_conv2d_backward(gy, x, w, a, bias, **params, **DIRECT)
    assert rel_err(grads[0], as64(direct[0])) <= 4 * u
    for name, mine, theirs in zip(("weight", "attention", "bias"), grads[1:], direct[1:]):
        assert np.array_equal(mine.view(np.uint16), theirs.view(np.uint16)), name


@pytest.mark.parametrize("wrt, expected", [
    ("input", ["conv2d_igemm_dynamic_bwd_input"]),
    ("weight", ["dynamic_conv2d_bwd_weight"]),
    (("attention", "bias"), ["dynamic_conv2d_bwd_bias", "dynamic_conv2d_bwd_attention", "dynamic_conv2d_reduce"]),
])
def test_wrt_subsets(launches, wrt, expected):
    x, w, a, bias, gy, params = make_inputs(CASES[0], "float16")
    full = dynamic_conv2d_backward(gy, x, w, a, bias, **params, **IGEMM)
    launches.clear()
    got = dynamic_conv2d_backward(gy, x, w, a, bias, **params, wrt=wrt, **IGEMM)
    assert launches == expected
    names = (wrt,) if isinstance(wrt, str) else wrt
    for name, one, everything in zip(("input", "weight", "attention", "bias"), got, full):
        if name in names:
            assert np.array_equal(one.view(np.uint16), everything.view(np.uint16)), name
        else:
            assert one is None, name


@pytest.mark.parametrize("probes,forward,grad_input", [
    ("pass", "conv2d_igemm_dynamic_fwd", "conv2d_igemm_dynamic_bwd_input"),
    ("fail", "dynamic_conv2d_fwd", "dynamic_conv2d_bwd_input")])
def test_auto_follows_the_tensor_core_verdict(launches, monkeypatch, probes, forward, grad_input):
    """'auto' is 'implicit_gemm' (several input channels per group) where the tensor-core
    probes passed, else 'direct' (cuconv/_probes.py, tests/test_probes.py)."""
    from cuconv import _probes

    monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", probes)
    _probes.forget()
    x, w, a, bias, gy, params = make_inputs(CASES[0], "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the forced failure's warning
        y_auto = dynamic_conv2d(x, w, a, bias, **params)
        assert launches == [forward]
        y_named = dynamic_conv2d(x, w, a, bias, **params, **(IGEMM if probes == "pass" else DIRECT))
        assert np.array_equal(y_auto.view(np.uint16), y_named.view(np.uint16))
        launches.clear()
        dynamic_conv2d_backward(gy, x, w, a, bias, **params, wrt="input")
    _probes.forget()
    assert launches == [grad_input]


def test_batch_zero_and_one():
    w, bias = np.ones((3, 4, 2, 3, 3), np.float16), np.ones((3, 4), np.float16)
    y = dynamic_conv2d(np.zeros((0, 4, 6, 5), np.float16), w, np.zeros((0, 3), np.float16), bias, padding=1,
                       groups=2, **IGEMM)
    assert y.shape == (0, 4, 6, 5) and y.dtype == np.float16
    grads = dynamic_conv2d_backward(np.zeros((0, 4, 6, 5), np.float16), np.zeros((0, 4, 6, 5), np.float16), w,
                                    np.zeros((0, 3), np.float16), bias, padding=1, groups=2, **IGEMM)
    assert grads[0].shape == (0, 4, 6, 5) and grads[2].shape == (0, 3) and not grads[1].any()
    # batch 1: one sample is one GEMM per group
    x, w, a, bias, gy, params = make_inputs(CASES[2], "float16")
    assert x.shape[0] == 1
    y_ref = reference.dynamic_conv2d(as64(x), as64(w), as64(a), as64(bias), **params)
    y_anchor, _ = torch_anchor(x, w, a, bias, gy, "float16", **params)
    assert within_twice_anchor(dynamic_conv2d(x, w, a, bias, **params, **IGEMM), y_anchor, y_ref, "float16")


def test_deterministic_bitwise():
    x, w, a, bias, gy, params = make_inputs(CASES[3], "bfloat16")

    def run():
        y = dynamic_conv2d(x, w, a, bias, **params, **IGEMM)
        gx = dynamic_conv2d_backward(gy, x, w, a, bias, **params, wrt="input", **IGEMM)[0]
        return y.view(np.uint16), gx.view(np.uint16)

    for first, second in zip(run(), run()):
        assert np.array_equal(first, second)


def test_no_mixed_kernel_sized_allocation():
    """Only the outputs are allocated: the per-sample kernels live in the staged B tile."""
    x, w, a, bias, gy, params = make_inputs(CASES[0], "float16")
    with _arrays.track_allocations() as allocations:
        y = dynamic_conv2d(x, w, a, bias, **params, **IGEMM)
    assert allocations == [(y.shape, "float16")]
    with _arrays.track_allocations() as allocations:
        dynamic_conv2d_backward(gy, x, w, a, bias, **params, wrt="input", **IGEMM)
    assert allocations == [(x.shape, "float16")]


def test_launchers_directly_and_tf32_float32():
    """The launchers on explicit operands; float32 through TF32 (not exposed by
    dynamic_conv2d) falls out of the same kernels: within a few TF32 units of float64."""
    for dtype, tf32, tol in (("float16", False, None), ("float32", True, 4 * 2.0 ** -11)):
        x, w, a, bias, gy, params = make_inputs(CASES[1][:10] + (True,), dtype)
        call = Call("dynamic_conv2d", input=x, weight=w, attention=a, bias=bias)
        geom = conv_geometry("dynamic_conv2d", x.shape, w.shape[1:], None, params["stride"], params["padding"], 1,
                             params["groups"])
        y = call.empty(geom.output_shape)
        launch_igemm_dynamic_forward(call, geom, call.operand("input"), call.operand("weight"),
                                     call.operand("attention"), call.operand("bias"), y, tf32=tf32)
        gcall = Call("dynamic_conv2d_backward", grad_output=gy, weight=w, attention=a)
        gx = gcall.empty(x.shape)
        launch_igemm_dynamic_grad_input(gcall, geom, gcall.operand("grad_output"), gcall.operand("weight"),
                                        gcall.operand("attention"), gx, tf32=tf32)
        y_ref = reference.dynamic_conv2d(as64(x), as64(w), as64(a), as64(bias), **params)
        gx_ref = reference.dynamic_conv2d_backward(as64(gy), as64(x), as64(w), as64(a), as64(bias), **params)[0]
        if tol is None:
            assert np.array_equal(to_numpy(call.export(y)), dynamic_conv2d(x, w, a, bias, **params, **IGEMM))
            assert np.array_equal(to_numpy(gcall.export(gx)), dynamic_conv2d_backward(
                gy, x, w, a, bias, **params, wrt="input", **IGEMM)[0])
        else:
            assert rel_err(call.export(y), y_ref) <= tol and rel_err(gcall.export(gx), gx_ref) <= tol


def test_supported():
    geom = conv_geometry("dynamic_conv2d", (2, 4, 8, 8), (6, 2, 3, 3), None, 2, 1, 1, 2)
    assert dynamic_implicit_gemm_supported(geom, "float16") is None
    assert dynamic_implicit_gemm_supported(geom, "bfloat16") is None
    for dtype in ("float32", "float64"):
        assert dtype in dynamic_implicit_gemm_supported(geom, dtype)
    assert {f"{k}<{t}>" for k in ("conv2d_igemm_dynamic_fwd", "conv2d_igemm_dynamic_bwd_input")
            for t in ("__half", "__nv_bfloat16", "float")} <= set(KERNELS.name_expressions)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unsupported_dtype_launches_nothing(dtype, launches):
    x, w, a, bias, gy, params = make_inputs(CASES[0], dtype)
    with pytest.raises(ValueError, match=r"algorithm='implicit_gemm' supports only float16 and bfloat16"):
        dynamic_conv2d(x, w, a, bias, **params, **IGEMM)
    with pytest.raises(ValueError, match=r"dynamic_conv2d_backward: algorithm='implicit_gemm'"):
        dynamic_conv2d_backward(gy, x, w, a, bias, **params, **IGEMM)
    assert launches == []


@pytest.mark.parametrize("algorithm", ["fft", "implicit_gemm_tf32", "IMPLICIT_GEMM", None])
def test_unknown_algorithm_launches_nothing(algorithm, launches):
    x, w, a, bias, gy, params = make_inputs(CASES[0], "float16")
    with pytest.raises(ValueError, match=r"dynamic_conv2d: algorithm must be"):
        dynamic_conv2d(x, w, a, bias, **params, algorithm=algorithm)
    with pytest.raises(ValueError, match=r"dynamic_conv2d_backward: algorithm must be"):
        dynamic_conv2d_backward(gy, x, w, a, bias, **params, algorithm=algorithm)
    assert launches == []


def test_bad_attention_in_the_launcher_launches_nothing(launches):
    x, w, a, bias, gy, params = make_inputs(CASES[0], "float16")
    call = Call("dynamic_conv2d", input=x, weight=w, attention=a[:, :2])
    geom = conv_geometry("dynamic_conv2d", x.shape, w.shape[1:], None, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="attention must have shape"):
        launch_igemm_dynamic_forward(call, geom, call.operand("input"), call.operand("weight"),
                                     call.operand("attention"), None, call.empty(geom.output_shape))
    assert launches == []


def test_odconv_takes_no_algorithm():
    x, w, a, _, _, params = make_inputs(CASES[0], "float16")
    with pytest.raises(TypeError):
        odconv2d(x, w, a, **params, algorithm="implicit_gemm")
