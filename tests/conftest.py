"""Shared test machinery: the backend parametrization and array helpers.

Every output cuconv allocates is filled with NaN before its kernel runs
(CUCONV_POISON=1), so an element a kernel fails to write fails the comparison."""

import os
import sys
import warnings
from pathlib import Path

os.environ["CUCONV_POISON"] = "1"
# JAX on a GPU would otherwise take 75% of its memory in every worker that starts it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# bench/ is a repo-root package (installed as cuconv.bench): tests import it, e.g. the
# torch oracles its self-check shares with them.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BACKENDS = [
    "interpret",
    pytest.param("cuda", marks=pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend a test runs on: its arrays live where that backend runs."""
    return request.param


def to_backend(a, backend):
    """A NumPy array as the array type the backend runs on natively (a CuPy array on the
    GPU, bfloat16 included)."""
    if a is None or backend == "interpret":
        return a
    import cupy

    return cupy.asarray(a)


def to_numpy(a):
    if a is None:
        return None
    if type(a).__module__.startswith("torch"):
        import torch

        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64 (NaN if actual has NaN)."""
    actual = np.asarray(to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
    return float(np.abs(actual - expected).max() / scale)


DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}


def unit_roundoff(dtype: str) -> float:
    return float(ml_dtypes.finfo(DTYPES[dtype]).eps) / 2


def torch_autograd(fn, arrays, grad_output, dtype: str = "float64"):
    """An independent oracle: fn(*tensors) in torch (CPU) with autograd, the arrays cast
    to `dtype`. Returns (y, [grad per array, None where the array is None]) as float64
    NumPy; grad_output=None skips the backward."""
    import torch

    torch_dtype = getattr(torch, dtype)
    leaves = [None if a is None else torch.tensor(np.asarray(a, np.float64), dtype=torch_dtype, requires_grad=True)
              for a in arrays]
    with warnings.catch_warnings():  # torch's note that 'same' with an even kernel copies the input
        warnings.simplefilter("ignore", UserWarning)
        y = fn(*leaves)
    if grad_output is not None:
        y.backward(torch.tensor(np.asarray(grad_output, np.float64), dtype=torch_dtype))
    as64 = lambda t: None if t is None else t.detach().to(torch.float64).numpy()  # noqa: E731
    return as64(y), [None if t is None else as64(t.grad) for t in leaves]


def within_twice_anchor(got, anchor, ref, dtype: str) -> bool:
    """DESIGN.md §5: error against the float64 reference at most 2x the anchor's (torch in
    the same dtype), plus two units of the output's own rounding, which both incur."""
    return rel_err(got, ref) <= 2 * rel_err(anchor, ref) + 2 * unit_roundoff(dtype)


def assert_reduced_precision(op, op_backward, reference, reference_backward, torch_fn, arrays, params, dtype: str,
                             seed: int = 0) -> None:
    """DESIGN.md §5 for one configuration: the arrays are rounded to `dtype` (the float64
    reference sees exactly those values), torch_fn(*tensors) in `dtype` is the anchor, and
    the op's output and every gradient must be within twice the anchor's error."""
    as64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    args = [None if a is None else np.asarray(a).astype(DTYPES[dtype]) for a in arrays]
    y_ref = reference(*map(as64, args), **params)
    gy = np.random.default_rng(seed).standard_normal(y_ref.shape).astype(DTYPES[dtype])
    refs = [y_ref, *reference_backward(as64(gy), *map(as64, args), **params)]
    anchor_y, anchor_grads = torch_autograd(torch_fn, list(map(as64, args)), as64(gy), dtype)
    y = op(*args, **params)
    assert y.dtype == DTYPES[dtype]
    for index, (got, anchor, ref) in enumerate(zip([y, *op_backward(gy, *args, **params)],
                                                   [anchor_y, *anchor_grads], refs)):
        if ref is not None:
            assert within_twice_anchor(got, anchor, ref, dtype), f"result {index} (0 = output, then gradients)"


def assert_all_match(got, *expected, names=(), tol: float = 1e-10, context="") -> None:
    """Each result (the output, then the gradients) within `tol` (rel_err) of its
    counterpart in every expected list; None wherever the expectation is None."""
    for expected_list in expected:
        assert len(got) == len(expected_list), (context, len(got), len(expected_list))
    for index, result in enumerate(got):
        name = names[index] if index < len(names) else f"result {index}"
        for expected_list in expected:
            if expected_list[index] is None:
                assert result is None, (context, name)
            else:
                error = rel_err(result, expected_list[index])
                assert error < tol, (context, name, error)


def assert_gradients_match_finite_differences(forward, backward, arrays, params, rng, samples: int = 8,
                                              eps: float = 1e-6, rtol: float = 1e-6) -> None:
    """backward is the derivative of forward (float64 references): central differences of
    sum(gy * forward(...)) at `samples` random elements of every array argument that is
    not None, against backward(gy, ...)'s entry for it."""
    gy = rng.standard_normal(np.shape(forward(*arrays, **params)))
    analytic = backward(gy, *arrays, **params)
    for which, array in enumerate(arrays):
        if array is None:
            continue
        for flat in rng.choice(array.size, size=min(samples, array.size), replace=False):
            index = np.unravel_index(flat, array.shape)
            bumped = [None if a is None else a.copy() for a in arrays]
            bumped[which][index] += eps
            plus = np.sum(gy * forward(*bumped, **params))
            bumped[which][index] -= 2 * eps
            numeric = (plus - np.sum(gy * forward(*bumped, **params))) / (2 * eps)
            assert abs(numeric - analytic[which][index]) < rtol * max(1.0, abs(numeric)), \
                f"{getattr(forward, '__name__', forward)}: argument {which}, element {index}"


def conv2d_through(forward, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, **options):
    """forward(call, geom, **options) on the Call and geometry conv2d() builds: one
    algorithm's entry point run directly, as conv2d() dispatches it."""
    from cuconv.ops._common import Call
    from cuconv.ops.conv2d import conv_geometry

    call = Call("conv2d", input=x, weight=w, bias=b, optional=("bias",))
    geom = conv_geometry("conv2d", call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups)
    return forward(call, geom, **options)


def conv2d_backward_through(gradients, gy, x, w, b=None, stride=1, padding=0, dilation=1, groups=1, wrt=None,
                            **options):
    """gradients(call, geom, wanted, has_bias, **options) as conv2d_backward() dispatches it."""
    from cuconv.ops._common import Call, check_grad_output, parse_wrt
    from cuconv.ops.conv2d import conv_geometry

    op = "conv2d_backward"
    call = Call(op, input=x, grad_output=gy, weight=w, bias=b, optional=("bias",))
    geom = conv_geometry(op, call.shape("input"), call.shape("weight"), call.shape("bias"),
                         stride, padding, dilation, groups)
    check_grad_output(op, call, geom.output_shape)
    return gradients(call, geom, parse_wrt(op, wrt, ("input", "weight", "bias")), b is not None, **options)


def depthwise_through(forward, gradients):
    """(conv2d, conv2d_backward) run by one depthwise algorithm's entry points, as conv2d() /
    conv2d_backward() dispatch them; groups defaults to the input's channels."""
    def conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=None):
        groups = x.shape[1] if groups is None else groups
        return conv2d_through(forward, x, w, b, stride, padding, dilation, groups)

    def conv_backward(gy, x, w, b=None, stride=1, padding=0, dilation=1, groups=None, wrt=None):
        groups = x.shape[1] if groups is None else groups
        return conv2d_backward_through(gradients, gy, x, w, b, stride, padding, dilation, groups, wrt)

    return conv, conv_backward


def depthwise_case_arrays(case, seed):
    """(x, w, b, params) of a depthwise test case (batch, channels, multiplier, H, W, k,
    params, bias); k an int or (kh, kw)."""
    batch, c, m, h, w_, k, params, with_bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, c, h, w_))
    w = rng.standard_normal((c * m, 1, kh, kw))
    b = rng.standard_normal(c * m) if with_bias else None
    return x, w, b, params


def depthwise_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1):
    """conv2d's geometry of a depthwise conv (groups = in_channels)."""
    from cuconv.ops.conv2d import conv_geometry

    return conv_geometry("conv2d", x_shape, w_shape, None, stride, padding, dilation, x_shape[1])


def assert_wrt_subset(got, full, wrt) -> None:
    """A backward called with `wrt` gives, bit for bit, the full call's gradients it was
    asked for and None for the others (results in (input, weight, bias) order)."""
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    for name, one, everything in zip(("input", "weight", "bias"), got, full):
        if name in names:
            one, everything = to_numpy(one), to_numpy(everything)
            assert one.dtype == everything.dtype and one.shape == everything.shape, name
            assert one.tobytes() == everything.tobytes(), name
        else:
            assert one is None, name


@pytest.fixture
def launches(monkeypatch):
    """Names of the kernels launched during the test (to prove a bad input launched nothing)."""
    from cuconv.ops import _common

    calls = []
    original = _common.Call.launch
    monkeypatch.setattr(_common.Call, "launch", lambda self, *a, **k: (calls.append(a[1]), original(self, *a, **k)))
    return calls


# --- bit-exact checks of the permutation ops (pixel_shuffle, channel_shuffle) ---

BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# A quiet NaN with a non-default payload: distinct from the poison (default) NaN, so an
# element a kernel leaves unwritten never matches it, and payload-exact copies are checked.
PAYLOAD_NAN = {"float16": 0x7E01, "bfloat16": 0x7FC1, "float32": 0x7FC00001, "float64": 0x7FF8000000000001}


def bits(a) -> np.ndarray:
    """The raw bits of an array (any framework) as unsigned integers: equality is bit-exactness."""
    a = np.ascontiguousarray(to_numpy(a))
    return a.view(BITS[a.dtype.itemsize])


def as_torch(a: np.ndarray):
    """A NumPy array (bfloat16 included) as a CPU tensor with the same bits."""
    import torch

    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def random_input(shape, dtype: str, seed: int, specials: bool = True) -> np.ndarray:
    """Fresh normal values in `dtype`; with `specials`, a payload NaN, +-Inf and -0.0 at
    random places (NaN/Inf pass through; -0.0 keeps its sign bit)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(DTYPES[dtype])
    if specials and x.size >= 4:
        flat = x.reshape(-1)
        where = rng.choice(x.size, size=4, replace=False)
        flat.view(BITS[x.itemsize])[where[0]] = PAYLOAD_NAN[dtype]
        flat[where[1]], flat[where[2]], flat[where[3]] = np.inf, -np.inf, -0.0
    return x


def skip_unsupported(backend, dtype):
    """CuPy types bfloat16 arrays (ml_dtypes.bfloat16) only with NumPy >= 2.1.2."""
    if backend == "cuda" and dtype == "bfloat16" and np.lib.NumpyVersion(np.__version__) < "2.1.2":
        pytest.skip("CuPy has bfloat16 only with NumPy >= 2.1.2")


def assert_matches_reference(got, expected_float64):
    """Value equality with the float64 reference (NaN where it has NaN) and the right shape."""
    got = np.asarray(to_numpy(got)).astype(np.float64)
    assert got.shape == expected_float64.shape
    np.testing.assert_array_equal(got, expected_float64)


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason, with its count, instead of hundreds of bare 's'."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.write_sep("-", "skipped tests, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count:6d}  {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Every core by default, when pytest-xdist is installed (the test extra has it), with
    a file's tests on one worker; `-n N` or `-p no:xdist` choose otherwise. Without
    xdist (an image that lacks it) the tests run in one process, as before."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker itself: it must not start workers
        return
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None) is None:
        config.option.numprocesses = "auto"
        if config.getoption("dist", "no") == "no":
            config.option.dist = "loadfile"
