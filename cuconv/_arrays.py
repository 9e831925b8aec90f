"""Array interop: any framework's array in, a NumPy or CuPy view for the kernels, the
caller's framework out.

Complex arrays (complex64, complex128: DLPack's kDLComplex) are imported only for the
arguments an op names as complex (`import_array(..., allow_complex=True)`, which
`Call(complex_args=...)` passes); every other argument rejects them with the usual
dtype TypeError.

Arguments are imported through DLPack without copies: host arrays (NumPy, CPU torch,
CPU JAX) become NumPy arrays, CUDA arrays (CuPy, CUDA torch, GPU JAX) become CuPy
arrays. bfloat16 has no DLPack/NumPy-native type, so it travels as 16-bit integers
and is typed `ml_dtypes.bfloat16` on the host; on the device it stays an int16 view
(kernels only see pointers, the dtype name picks the instantiation).

Outputs are allocated by the framework of the op's `input` (torch's caching allocator
for torch tensors), so the returned object is the caller's kind of array on the
caller's device.
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
    if dtype == "bfloat16":  # DLPack consumers lack bfloat16: move the bits as int16
        source = source.view(_int16_of(framework))
    if device[0] == _DLPACK_CPU:
        data = np.from_dlpack(source)
        if dtype == "bfloat16":
            data = data.view(ml_dtypes.bfloat16)
    else:
        import cupy

        data = obj if framework == "cupy" else cupy.from_dlpack(source)
    return Array(data, dtype, framework, device, obj)


def _int16_of(framework: str):
    if framework == "torch":
        import torch

        return torch.int16
    return np.int16  # JAX and CuPy accept NumPy dtypes in .view


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


def empty(like: Array, shape: tuple[int, ...], on_host: bool, dtype: str | None = None) -> Array:
    """A new array of `shape` where the kernels of this call will run, allocated by the
    framework of `like` when that framework holds memory there."""
    dtype = dtype or like.dtype
    shape = tuple(int(s) for s in shape)
    record_allocation(shape, dtype)
    if like.framework == "torch" and on_host == like.on_host:
        import torch

        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=like.original.device)
        out = import_array("cuconv", "output", tensor, allow_complex=True)
    elif on_host:
        out = Array(np.empty(shape, numpy_dtype(dtype)), dtype, "numpy", (_DLPACK_CPU, 0), None)
    else:
        import cupy

        with cupy.cuda.Device(like.device[1] if like.device[0] == _DLPACK_CUDA else 0):
            data = cupy.empty(shape, np.int16 if dtype == "bfloat16" else numpy_dtype(dtype))
        out = Array(data, dtype, "cupy", (_DLPACK_CUDA, data.device.id), data)
    if poison_enabled() and out.data.size:
        if dtype == "bfloat16" and not out.on_host:
            out.data.fill(0x7FC0)  # the bfloat16 quiet NaN
        else:
            out.data.fill(np.nan)
    return out


def to_host(a: Array) -> Array:
    """A host copy of a device array (for a forced interpret backend)."""
    if a.on_host:
        return a
    record_allocation(a.shape, a.dtype)
    data = a.data.get()
    if a.dtype == "bfloat16":
        data = data.view(ml_dtypes.bfloat16)
    return Array(data, a.dtype, a.framework, a.device, a.original)


def to_device(a: Array, device_id: int = 0) -> Array:
    """A device copy of a host array (for a forced cuda backend)."""
    if not a.on_host:
        return a
    record_allocation(a.shape, a.dtype)
    import cupy

    with cupy.cuda.Device(device_id):
        data = cupy.asarray(a.data.view(np.int16) if a.dtype == "bfloat16" else a.data)
    return Array(data, a.dtype, a.framework, a.device, a.original)


def export(out: Array, like: Array):
    """`out` as the framework and device of `like` (the op's input)."""
    if out.framework == like.framework and out.device == like.device and out.original is not None:
        return out.original
    data = out.data
    if like.framework == "torch":
        import torch

        bits = data.view(np.int16) if out.dtype == "bfloat16" and out.on_host else data
        tensor = torch.from_dlpack(bits)
        if out.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.to(like.original.device)
    if like.framework == "jax":
        import jax
        import jax.numpy as jnp

        host = data if out.on_host else to_host(out).data
        return jax.device_put(jnp.asarray(host), like.original.devices().pop())
    if like.device[0] == _DLPACK_CPU:
        return data if out.on_host else to_host(out).data
    return to_device(out, like.device[1]).data if out.on_host else data
