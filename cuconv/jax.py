"""cuconv.jax: every cuconv op as a differentiable JAX function.

    import cuconv.jax as cj
    y = cj.conv2d(x, w, b, padding=1)                      # eager, jit, grad, vmap
    gx, gw = jax.grad(lambda x, w: cj.conv2d(x, w).sum(), argnums=(0, 1))(x, w)

`cuconv.jax.OP(*arrays, **params)` exists for every op of the registry (`cuconv._registry.OPS`),
with the signature of `cuconv.OP`. Array arguments are differentiable JAX values (None
for an absent optional array); the other arguments are static parameters (Python
values, closed over: they are part of the trace, not traced).

Each call builds (and caches, per op, present arrays and parameters) one
`jax.custom_vjp` function of the present arrays:

- primal / fwd: `cuconv.OP` on the arrays; the residuals are the arrays themselves
  (no backward of cuconv needs the forward's output).
- bwd: `cuconv.OP_backward(grad_output, *arrays, **params, wrt=<present arrays>)`, one
  cotangent per present array; complex arguments are conjugated into JAX's convention
  (below).

How the kernels run:

- **Concrete arrays** (eager calls, also the fwd/bwd of an eager `jax.grad`): cuconv is
  called on the JAX arrays themselves; they cross through DLPack without a copy, host
  arrays run on the `interpret` backend and CUDA arrays on the `cuda` backend.
- **Traced arrays** (under `jax.jit`, `jax.vmap`, `jax.lax.scan`, ...): a callback
  whose result shapes come from `cuconv._registry.output_shape`, so a bad shape raises at
  trace time with cuconv's own message. Two mechanisms (`CUCONV_JAX_CALLBACK`, read when
  a function is traced):
  - `buffer` (the default where `jax.experimental.buffer_callback` exists):
    `buffer_callback` hands the callback XLA's own buffers, viewed through DLPack
    without a copy: as NumPy arrays on the CPU (kernels on `interpret`), as CuPy arrays
    on a GPU (kernels on `cuda`, launched on XLA's stream `ctx.stream` under the
    buffers' device). The result is copied once into XLA's output buffer (cuconv ops
    allocate their outputs). Every dtype, bfloat16 included, takes this path.
  - `pure`: `jax.pure_callback`; the callback receives NumPy arrays (XLA copies device
    arrays to the host and the result back). For a computation on a CUDA device (the
    platform it is lowered for, through `jax.lax.platform_dependent`) the callback sends
    them to CuPy's current device and runs the `cuda` kernels there (the emulator would
    be far slower than the copies), unless `CUCONV_BACKEND=interpret` keeps them on the
    host; on the CPU it runs on `interpret`.

Complex gradients: cuconv's backward returns `dL/dRe z + i dL/dIm z` for a complex
argument z (PyTorch's convention). JAX's cotangent of a complex input is the conjugate,
`dL/dRe z - i dL/dIm z` (`jax.grad(lambda z: abs(z)**2)(3+4j) == 6-8j`), so the bwd
returns `conj(grad)` for an op's `complex_arrays` (spectral_filter2d's
filter). The tests check it against `jnp.fft`'s own autodiff.
"""

from __future__ import annotations

import functools
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np

from . import _arrays
from ._arrays import COMPLEX_DTYPES, DTYPES
from ._registry import OPS, get_op, output_shape
from .ops._common import forced_backend

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older JAX: pure_callback only
    _buffer_callback = None

CALLBACKS = ("buffer", "pure")
_COMPLEX_OF = {"float16": "complex64", "bfloat16": "complex64", "float32": "complex64", "float64": "complex128"}


def callback_mode() -> str:
    """The callback used for traced calls: CUCONV_JAX_CALLBACK=buffer|pure, default
    'buffer' where JAX has buffer_callback (else 'pure')."""
    mode = os.environ.get("CUCONV_JAX_CALLBACK", "").strip().lower()
    if mode and mode not in CALLBACKS:
        raise ValueError(f"CUCONV_JAX_CALLBACK={mode!r}; choose from {CALLBACKS}")
    if mode == "buffer" and _buffer_callback is None:
        raise ValueError("CUCONV_JAX_CALLBACK=buffer needs jax.experimental.buffer_callback (a newer JAX)")
    return mode or ("buffer" if _buffer_callback is not None else "pure")


# --- argument handling ---

def _freeze(value):
    """Parameters as hashable values (lists become tuples) for the function cache."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _check_dtypes(op: str, names: tuple[str, ...], xs) -> None:
    """cuconv's dtype contract, checked when tracing: one real dtype shared by the real
    arrays; a complex argument pairs complex64 with 16/32-bit inputs, complex128 with
    float64."""
    dtypes = {n: str(x.dtype) for n, x in zip(names, xs)}
    shown = ", ".join(f"{n}={d}" for n, d in dtypes.items())
    complex_args = get_op(op).complex_arrays
    real = dtypes[names[0]]
    for name, dtype in dtypes.items():
        allowed = COMPLEX_DTYPES if name in complex_args else DTYPES
        if dtype not in allowed:
            raise TypeError(f"{op}: {name} has dtype {dtype}; supported: {', '.join(allowed)} ({shown})")
    for name, dtype in dtypes.items():
        want = _COMPLEX_OF[real] if name in complex_args else real
        if dtype != want:
            raise TypeError(f"{op}: {name} has dtype {dtype}, expected {want} with input {real} ({shown})")


def _concrete(xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _host(a):
    """A callback argument as NumPy: ml_dtypes.bfloat16 stays typed as such."""
    return np.asarray(a)


# --- the two cuconv calls, on NumPy / CuPy / JAX arrays ---

def _run_forward(op, names, params, arrays):
    return get_op(op).forward(**dict(zip(names, arrays)), **params)


def _run_backward(op, names, params, grad_output, arrays):
    grads = get_op(op).backward(grad_output, **dict(zip(names, arrays)), **params, wrt=names)
    by_name = dict(zip(get_op(op).arrays, grads))
    return tuple(by_name[n] for n in names)


class _StreamHandle:
    """A raw stream pointer in the CUDA stream protocol, the form
    cupy.cuda.Stream.from_external takes (ExternalStream is deprecated)."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def _on_buffers(compute, ctx, outs, bufs) -> None:
    """Runs `compute(*arrays) -> results` on XLA's buffers and writes the results into
    XLA's output buffers: NumPy views on the host; on a GPU, CuPy views (DLPack keeps
    bfloat16 typed) with every CuPy operation and kernel on XLA's stream, so they are
    ordered with the rest of the computation without a synchronisation."""
    device = outs[0].__dlpack_device__()
    if int(device[0]) == 1:  # kDLCPU
        results = compute(*(_host(b) for b in bufs))
        for out, r in zip(outs, results):
            np.asarray(out)[...] = r
        return
    import cupy

    with _arrays.on_cupy_device(int(device[1]), _arrays.external_stream(_StreamHandle(ctx.stream))):
        results = compute(*(cupy.from_dlpack(b) for b in bufs))
        for out, r in zip(outs, results):
            out = cupy.from_dlpack(out)
            if out.dtype == jnp.bfloat16:  # copy the bits: no bfloat16 copy kernel to compile
                out, r = out.view(np.int16), r.view(np.int16)
            out[...] = r


def _on_host_arrays(compute, arrays, on_gpu: bool):
    """Runs `compute` for a pure_callback, whose arrays are on the host. For a computation
    on a GPU they go to CuPy's current device and the results come back, so the kernels
    run on `cuda` rather than on the (much slower) emulator; CUCONV_BACKEND=interpret
    keeps them on the host."""
    arrays = tuple(_host(a) for a in arrays)
    if not on_gpu or forced_backend() == "interpret":
        return tuple(np.asarray(r) for r in compute(*arrays))
    import cupy

    results = compute(*(cupy.asarray(a) for a in arrays))
    return tuple(cupy.asnumpy(r) for r in results)


def _callback(compute, result_types, xs):
    """compute(*arrays) -> tuple of arrays, as one traced JAX op with these results."""
    result_types = tuple(result_types)
    if callback_mode() == "buffer":  # the buffers' device says where the kernels run
        def cb(ctx, outs, *bufs):
            _on_buffers(compute, ctx, outs, bufs)

        return tuple(_buffer_callback(cb, result_types, vmap_method="sequential")(*xs))

    def staged(on_gpu):
        def host(*arrays):
            return _on_host_arrays(compute, arrays, on_gpu)

        return lambda *xs: tuple(jax.pure_callback(host, result_types, *xs, vmap_method="sequential"))

    # The platform the computation is lowered for (not the default backend: arrays may be
    # committed elsewhere) decides where the callback sends its host arrays.
    return tuple(jax.lax.platform_dependent(*xs, cuda=staged(True), default=staged(False)))


# --- custom_vjp ---

def _forward(op, names, params, xs):
    _check_dtypes(op, names, xs)
    shape = output_shape(op, {n: tuple(x.shape) for n, x in zip(names, xs)}, **params)
    if _concrete(xs):
        return jnp.asarray(_run_forward(op, names, params, xs))
    result = jax.ShapeDtypeStruct(shape, xs[0].dtype)
    return _callback(lambda *arrays: (_run_forward(op, names, params, arrays),), (result,), xs)[0]


def _backward(op, names, params, xs, grad_output):
    if _concrete(xs) and _concrete((grad_output,)):
        grads = tuple(jnp.asarray(g) for g in _run_backward(op, names, params, grad_output, xs))
    else:
        results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs)
        grads = _callback(lambda g, *arrays: _run_backward(op, names, params, g, arrays), results,
                          (grad_output, *xs))
    complex_args = get_op(op).complex_arrays
    return tuple(jnp.conj(g) if n in complex_args else g for n, g in zip(names, grads))


class HigherOrderGradientError(NotImplementedError):
    """A derivative cuconv.jax does not compute: forward mode, or a higher order through an
    array an op is not affine in (deform_conv2d's offset)."""


def _named(op: str, function, *args):
    """function(*args), with JAX's refusal to differentiate a custom_vjp function in forward
    mode (jax.jvp, jax.jacfwd, jax.hessian) turned into an error that names the op."""
    try:
        return function(*args)
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise HigherOrderGradientError(
            f"cuconv.jax.{op}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian) is not "
            f"supported; reverse mode is, to any order for ops affine in their arrays (jax.grad of jax.grad, "
            f"jax.jacrev)") from error


def _build(op: str, names: tuple[str, ...], params: dict):
    """The op as a custom_vjp function of its present arrays; its bwd is the differentiable
    backward below, so reverse mode works to any order."""
    @jax.custom_vjp
    def fn(*xs):
        return _forward(op, names, params, xs)

    def fwd(*xs):
        # fn itself, not its body: under an enclosing differentiation (grad of grad) the
        # primal result must be differentiable by that one too, through this same rule.
        return fn(*xs), xs

    def bwd(xs, grad_output):
        return _named(op, _differentiable(op, names, params, "backward"), grad_output, *xs)

    fn.defvjp(fwd, bwd)
    return fn


def _build_backward(op: str, names: tuple[str, ...], params: dict):
    """The op's backward (grad_output, *xs) -> one cotangent per array, as a custom_vjp
    function. The op is affine in each array a_i (but those of its OpDef's `nonlinear`):
    with c_i the cotangents of the backward's results (JAX's convention, which pairs
    with tangents as Re(sum(c * t))),
        d/d grad_output = sum_i op(a_{i<-c_i}) - op(a_{i<-0})
        d/d a_j         = sum_{i != j} backward(grad_output, a_{i<-c_i})_j - backward(grad_output, a_{i<-0})_j
    (cuconv.torch does the same in torch's convention). Both terms are the differentiable
    functions themselves, so every order follows."""
    nonlinear = [n for n in get_op(op).nonlinear if n in names]

    @jax.custom_vjp
    def grads(grad_output, *xs):
        return _backward(op, names, params, xs, grad_output)

    def fwd(grad_output, *xs):
        grad_output, xs = grad_output.value, tuple(x.value for x in xs)
        return grads(grad_output, *xs), (grad_output, xs)

    def bwd(residuals, cotangents):
        grad_output, xs = residuals
        given = {i: c for i, c in enumerate(cotangents) if not isinstance(c, jax.custom_derivatives.SymbolicZero)}
        if given and nonlinear:
            raise HigherOrderGradientError(
                f"cuconv.jax.{op}: higher-order gradients are not supported ({op} is not affine in "
                f"{', '.join(nonlinear)}); cuconv.torch.{op} computes them with a fixed {nonlinear[0]}")
        forward, backward = _differentiable(op, names, params), _differentiable(op, names, params, "backward")
        grad_gy, grad_xs = jnp.zeros_like(grad_output), [jnp.zeros_like(x) for x in xs]
        for i, c in given.items():
            with_c, with_zero = list(xs), list(xs)
            with_c[i], with_zero[i] = c, jnp.zeros_like(xs[i])
            grad_gy = grad_gy + _named(op, forward, *with_c) - _named(op, forward, *with_zero)
            plus, minus = _named(op, backward, grad_output, *with_c), _named(op, backward, grad_output, *with_zero)
            grad_xs = [g if j == i else g + (p - m) for j, (g, p, m) in enumerate(zip(grad_xs, plus, minus))]
        return (grad_gy, *grad_xs)

    grads.defvjp(fwd, bwd, symbolic_zeros=True)
    return grads


_BUILDERS = {"forward": _build, "backward": _build_backward}


@functools.lru_cache(maxsize=1024)
def _cached(op: str, names: tuple[str, ...], params: tuple, kind: str):
    return _BUILDERS[kind](op, names, dict(params))


def _differentiable(op: str, names: tuple[str, ...], params: dict, kind: str = "forward"):
    key = tuple(sorted(params.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable parameter value: build without caching
        return _BUILDERS[kind](op, names, params)
    return _cached(op, names, key, kind)


def _make(op: str):
    forward = get_op(op).forward
    signature = inspect.signature(forward)
    array_args = get_op(op).arrays

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        arrays = {n: bound.arguments.pop(n, None) for n in array_args}
        params = {k: _freeze(v) for k, v in bound.arguments.items()}
        names = tuple(n for n in array_args if arrays[n] is not None)
        xs = tuple(a if isinstance(a, jax.Array) else jnp.asarray(a) for a in (arrays[n] for n in names))
        return _named(op, _differentiable(op, names, params), *xs)

    wrapper.__name__ = wrapper.__qualname__ = op
    wrapper.__module__ = __name__
    wrapper.__signature__ = signature
    wrapper.__doc__ = (f"cuconv.{op} as a differentiable JAX function (jax.custom_vjp; eager, jit, grad, "
                       f"vmap). Arrays {array_args} (None for an absent optional one) are differentiated; "
                       f"the other arguments are static.\n\n" + (forward.__doc__ or ""))
    return wrapper


for _op in OPS:
    globals()[_op] = _make(_op)
del _op

__all__ = [*OPS, "callback_mode", "CALLBACKS"]
