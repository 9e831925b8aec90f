"""Array interop: any framework's array in, a NumPy or CuPy view for the kernels, the
caller's framework out.

Complex arrays (complex64, complex128: DLPack's kDLComplex) are imported only for the
arguments an op names as complex (`import_array(..., allow_complex=True)`, which
`Call(complex_args=...)` passes); every other argument rejects them with the usual
dtype TypeError.

Arguments are imported through DLPack without copies: host arrays (NumPy, CPU torch,
CPU JAX) become NumPy arrays, CUDA arrays (CuPy, CUDA torch, GPU JAX) become CuPy
arrays. bfloat16 is typed `ml_dtypes.bfloat16` on both sides: CuPy (>= 14.2, with
NumPy >= 2.1.2) imports and exports it through DLPack; NumPy's DLPack import has no
bfloat16, so on the host it travels as 16-bit integers and is retyped.

Outputs are allocated by the framework of the op's `input` (torch's caching allocator
for torch tensors), so the returned object is the caller's kind of array on the
caller's device. CuPy work runs under `on_cupy_device`: CuPy allocates, copies and
fills on the current device's current stream, which must be the call's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = ("float16", "bfloat16", "float32", "float64")
COMPLEX_DTYPES = ("complex64", "complex128")
_NUMPY_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                 "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128)}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16}
_DLPACK_CPU, _DLPACK_CUDA = 1, 2


def numpy_dtype(dtype: str) -> np.dtype:
    return _NUMPY_DTYPES[dtype]


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def _framework(obj) -> str:
    if isinstance(obj, np.ndarray):
        return "numpy"
    root = type(obj).__module__.split(".")[0]
    if root in ("torch", "cupy"):
        return root
    if root in ("jax", "jaxlib"):
        return "jax"
    if hasattr(obj, "__dlpack__"):
        return "dlpack"
    return ""


def _dtype_name(obj, framework: str) -> str:
    name = str(obj.dtype)
    if framework == "torch":
        name = name.removeprefix("torch.")
    return name


@dataclass
class Array:
    """One array argument: `data` is its NumPy (host) or CuPy (device) view."""

    data: object
    dtype: str
    framework: str  # of the object the caller passed
    device: tuple[int, int]  # DLPack (device_type, device_id) where the caller's array lives
    original: object

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def on_host(self) -> bool:
        return isinstance(self.data, np.ndarray)

    @property
    def device_name(self) -> str:
        kind, index = self.device
        return "cpu" if kind == _DLPACK_CPU else f"cuda:{index}"


def import_array(op: str, name: str, obj, allow_complex: bool = False) -> Array:
    """Views `obj` without a copy; TypeError naming `name` if it is no supported array
    (complex dtypes are supported only with allow_complex)."""
    framework = _framework(obj)
    if not framework:
        raise TypeError(f"{op}: {name} must be an array (NumPy, CuPy, PyTorch, JAX or any object "
                        f"with __dlpack__), got {type(obj).__name__}")
    dtype = _dtype_name(obj, framework)
    if dtype not in DTYPES and not (allow_complex and dtype in COMPLEX_DTYPES):
        supported = DTYPES + COMPLEX_DTYPES if allow_complex else DTYPES
        raise TypeError(f"{op}: {name} has dtype {dtype}; supported: {', '.join(supported)}")
    if framework == "numpy":
        return Array(obj, dtype, framework, (_DLPACK_CPU, 0), obj)
    device = tuple(int(v) for v in obj.__dlpack_device__())
    if device[0] not in (_DLPACK_CPU, _DLPACK_CUDA):
        raise ValueError(f"{op}: {name} is on DLPack device type {device[0]}; only CPU and CUDA are supported")
    source = obj.detach() if framework == "torch" else obj
    if framework == "torch" and dtype in COMPLEX_DTYPES and (source.is_conj() or source.is_neg()):
        record_allocation(tuple(source.shape), dtype)  # DLPack cannot carry torch's lazy conj/neg bits
        source = source.resolve_conj().resolve_neg()
    if device[0] == _DLPACK_CPU:
        if dtype == "bfloat16":  # NumPy's DLPack import lacks bfloat16: move the bits as int16
            source = source.view(_int16_of(framework))
        data = np.from_dlpack(source)
        if dtype == "bfloat16":
            data = data.view(ml_dtypes.bfloat16)
    elif framework == "torch":
        import cupy
        import torch

        # With CuPy's current stream being torch's, torch's __dlpack__ has nothing to
        # order; any other stream gets an event wait, which breaks torch.cuda.graph capture.
        with on_cupy_device(device[1], external_stream(torch.cuda.current_stream(source.device))):
            data = cupy.from_dlpack(source)
    else:
        import cupy

        data = obj if framework == "cupy" else cupy.from_dlpack(source)
    return Array(data, dtype, framework, device, obj)


def _int16_of(framework: str):
    if framework == "torch":
        import torch

        return torch.int16
    return np.int16  # JAX accepts NumPy dtypes in .view


def poison_enabled() -> bool:
    """CUCONV_POISON=1 fills every output with NaN before the kernel writes it, so an
    element a kernel forgets to write shows up (the test suite turns it on)."""
    return os.environ.get("CUCONV_POISON", "") not in ("", "0")


_allocation_logs: list[list] = []


@contextlib.contextmanager
def track_allocations():
    """Records (shape, dtype) of every array cuconv allocates inside the block: outputs,
    workspaces and contiguous copies (every op allocates through `empty` or
    `record_allocation`). A test uses it to prove a fused path allocates no intermediate."""
    log: list[tuple[tuple[int, ...], str]] = []
    _allocation_logs.append(log)
    try:
        yield log
    finally:
        _allocation_logs.remove(log)


def record_allocation(shape, dtype: str) -> None:
    for log in _allocation_logs:
        log.append((tuple(int(s) for s in shape), dtype))


@contextlib.contextmanager
def on_cupy_device(device_id: int, stream=None):
    """CuPy's current device for the block, and `stream` its current stream there when
    given: CuPy allocates, copies and fills on the current device's current stream.
    Without `stream` that is the device's own current stream, which is a call's stream
    whenever CuPy does the call's work (a torch-CUDA call runs on torch's stream, but
    torch makes its outputs and copies)."""
    import cupy

    with cupy.cuda.Device(device_id), (contextlib.nullcontext() if stream is None else stream):
        yield


def external_stream(stream):
    """A CuPy stream for another framework's CUDA stream: anything implementing the CUDA
    stream protocol (`__cuda_stream__`), e.g. a torch.cuda.Stream. Built per call: the
    CuPy stream holds a reference to `stream`, so a cache would keep it alive."""
    import cupy

    return cupy.cuda.Stream.from_external(stream)


def empty(like: Array, shape: tuple[int, ...], on_host: bool, dtype: str | None = None) -> Array:
    """A new array of `shape` where the kernels of this call will run, allocated by the
    framework of `like` when that framework holds memory there."""
    dtype = dtype or like.dtype
    shape = tuple(int(s) for s in shape)
    record_allocation(shape, dtype)
    poison = poison_enabled() and int(np.prod(shape)) > 0
    if like.framework == "torch" and on_host == like.on_host:
        import torch

        # torch allocates and fills on its current stream, the stream of a torch call's kernels
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=like.original.device)
        if poison:
            tensor.fill_(float("nan"))
        return import_array("cuconv", "output", tensor, allow_complex=True)
    if on_host:
        data = np.empty(shape, numpy_dtype(dtype))
        if poison:
            data.fill(np.nan)
        return Array(data, dtype, "numpy", (_DLPACK_CPU, 0), None)
    import cupy

    device_id = like.device[1] if like.device[0] == _DLPACK_CUDA else 0
    with on_cupy_device(device_id):
        data = cupy.empty(shape, numpy_dtype(dtype))
        if poison and dtype == "bfloat16":
            data.view(np.int16).fill(0x7FC0)  # the bfloat16 quiet NaN, without a bfloat16 fill kernel
        elif poison:
            data.fill(np.nan)
    return Array(data, dtype, "cupy", (_DLPACK_CUDA, device_id), data)


def to_host(a: Array) -> Array:
    """A host copy of a device array (for a forced interpret backend)."""
    if a.on_host:
        return a
    record_allocation(a.shape, a.dtype)
    return Array(a.data.get(), a.dtype, a.framework, a.device, a.original)


def to_device(a: Array, device_id: int = 0) -> Array:
    """A device copy of a host array (for a forced cuda backend), made on `device_id`'s
    current stream."""
    if not a.on_host:
        return a
    record_allocation(a.shape, a.dtype)
    import cupy

    with on_cupy_device(device_id):
        data = cupy.asarray(a.data)
    return Array(data, a.dtype, a.framework, a.device, a.original)


def export(out: Array, like: Array):
    """`out` as the framework and device of `like` (the op's input)."""
    if out.framework == like.framework and out.device == like.device and out.original is not None:
        return out.original
    data = out.data
    if like.framework == "torch":
        import torch

        if out.dtype == "bfloat16" and out.on_host:  # NumPy exports no bfloat16: its bits as int16
            tensor = torch.from_dlpack(data.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_dlpack(data)
        return tensor.to(like.original.device)
    if like.framework == "jax":
        import jax
        import jax.numpy as jnp

        if not out.on_host and like.device[0] == _DLPACK_CUDA:
            return jnp.from_dlpack(data)  # stays on the GPU, no copy
        host = data if out.on_host else to_host(out).data
        return jax.device_put(jnp.asarray(host), like.original.devices().pop())
    if like.device[0] == _DLPACK_CPU:
        return data if out.on_host else to_host(out).data
    return to_device(out, like.device[1]).data if out.on_host else data
