"""A fake CuPy that is as strict as a GPU, to drive cuconv's `cuda` backend on a machine
without one (`install(monkeypatch)` puts it in sys.modules as cupy, cupy.cuda, ...).

It models what a GPU punishes and NumPy forgives: DEVICES devices, a current device,
a current stream per device, arrays that live on one device, and modules loaded into
one device's context. Every operation that allocates, copies, fills or computes is
recorded in `log` as (operation, current device, current stream's ptr) and raises if an
array it touches lives on another device, as a kernel reading another GPU's memory
would fail. Views (reshape, transpose, basic indexing, .view) launch nothing on a GPU,
so they are neither recorded nor checked.

Kernels run through the interpret backend on the arrays' NumPy buffers (the same
compiled .cu), so results through the fake equal the interpret backend's bit for bit.
Only what cuconv calls exists; anything else is an AttributeError, which is the point.
"""

from __future__ import annotations

import itertools
import sys
import types
import warnings

import numpy as np
import scipy.fft

DEVICES = 2
_KDL_CUDA = 2


class _State:
    def __init__(self):
        self.device = 0
        self.streams = [[Stream.null] for _ in range(DEVICES)]  # per device: the `with` stack
        self.log: list[tuple[str, int, int]] = []  # (operation, device, stream ptr)
        self.loads: list[tuple[str, int]] = []  # (kernel file, device) per module load
        self.resolutions: list[tuple[str, int, str]] = []  # (kernel file, device, name expression)

    def current_stream(self, device: int | None = None):
        return self.streams[self.device if device is None else device][-1]


_ptrs = itertools.count(0x1000)


def _check_device(device: int, what: str) -> None:
    if device != state.device:
        raise RuntimeError(f"fake cupy: {what} lives on device {device} but device {state.device} is current")


def _record(operation: str, operands=()) -> None:
    for a in _arrays_in(operands):
        _check_device(a.device.id, f"an operand of {operation}")
    state.log.append((operation, state.device, state.current_stream().ptr))


def _arrays_in(items):
    for item in items:
        if isinstance(item, ndarray):
            yield item
        elif isinstance(item, (tuple, list)):
            yield from _arrays_in(item)


def _host(item):
    """An argument with every fake array replaced by its buffer."""
    if isinstance(item, ndarray):
        return item._buffer
    if isinstance(item, tuple):
        return tuple(_host(i) for i in item)
    return item


def _device_op(name, function):
    """`function` on buffers as a recorded operation whose array results live on the current device."""
    def run(*args, **kwargs):
        _record(name, args + tuple(kwargs.values()))
        result = function(*(_host(a) for a in args), **{k: _host(v) for k, v in kwargs.items()})
        return ndarray(result, state.device) if isinstance(result, np.ndarray) else result

    run.__name__ = name
    return run


# --- devices and streams ---

class Device:
    def __init__(self, device_id: int = None):
        self.id = state.device if device_id is None else int(device_id)
        if not 0 <= self.id < DEVICES:
            raise RuntimeError(f"fake cupy: no device {self.id} (there are {DEVICES})")
        self._previous = []

    @property
    def attributes(self) -> dict:
        return {"MaxSharedMemoryPerBlock": 48 * 1024}

    def __enter__(self):
        self._previous.append(state.device)
        state.device = self.id
        return self

    def __exit__(self, *exc):
        state.device = self._previous.pop()


class _BaseStream:
    def __init__(self, ptr: int, device_id: int):
        self.ptr, self.device_id = ptr, device_id
        self._entered_on = []

    def __eq__(self, other):
        return isinstance(other, _BaseStream) and other.ptr == self.ptr

    def __hash__(self):
        return self.ptr

    def __enter__(self):
        # as CuPy: a stream becomes current only on its own device
        if self.device_id not in (-1, state.device):
            raise RuntimeError(f"fake cupy: stream of device {self.device_id} entered on device {state.device}")
        state.streams[state.device].append(self)
        self._entered_on.append(state.device)
        return self

    def __exit__(self, *exc):
        state.streams[self._entered_on.pop()].pop()


class Stream(_BaseStream):
    null = None  # set below: ptr 0, usable on every device

    def __init__(self, null: bool = False):
        super().__init__(0, -1) if null else super().__init__(next(_ptrs), state.device)

    @classmethod
    def from_external(cls, obj):
        version, ptr = obj.__cuda_stream__()
        stream = cls.__new__(cls)
        _BaseStream.__init__(stream, ptr, -1)
        stream.foreign = obj
        return stream


Stream.null = Stream(null=True)
state = _State()  # install() gives each test a fresh one


class ExternalStream(_BaseStream):
    def __init__(self, ptr: int, device_id: int = -1):
        warnings.warn("cupy.cuda.ExternalStream is deprecated; use cupy.cuda.Stream.from_external",
                      DeprecationWarning, stacklevel=2)
        super().__init__(ptr, device_id)


def get_current_stream(device_id: int = -1):
    return state.current_stream(None if device_id == -1 else device_id)


class Event:
    def __init__(self):
        self.device = state.device

    def record(self, stream=None):
        _check_device(self.device, "the recorded event")
        stream = state.current_stream() if stream is None else stream
        state.log.append(("event.record", state.device, stream.ptr))

    def synchronize(self):
        pass


def get_elapsed_time(start: Event, stop: Event) -> float:
    return 1.0


class _Runtime:
    @staticmethod
    def runtimeGetVersion() -> int:
        return 13000

    @staticmethod
    def getDeviceCount() -> int:
        return DEVICES

    @staticmethod
    def getDevice() -> int:
        return state.device

    @staticmethod
    def getDeviceProperties(device_id: int) -> dict:
        return {"name": b"Fake GPU", "major": 9, "minor": 0}


# --- arrays ---

class _Flags:
    def __init__(self, buffer):
        self.c_contiguous = buffer.flags.c_contiguous


class ndarray:
    def __init__(self, buffer: np.ndarray, device_id: int):
        self._buffer, self.device = buffer, Device(device_id)

    shape = property(lambda self: self._buffer.shape)
    dtype = property(lambda self: self._buffer.dtype)
    size = property(lambda self: self._buffer.size)
    ndim = property(lambda self: self._buffer.ndim)
    flags = property(lambda self: _Flags(self._buffer))

    def _view(self, buffer):
        return ndarray(buffer, self.device.id)

    def view(self, dtype):
        return self._view(self._buffer.view(dtype))

    def reshape(self, *shape):
        buffer = self._buffer.reshape(*shape)
        if not np.may_share_memory(buffer, self._buffer):  # NumPy had to copy, as CuPy would
            _record("reshape", (self,))
            return ndarray(buffer, state.device)
        return self._view(buffer)

    def transpose(self, *axes):
        return self._view(self._buffer.transpose(*axes))

    def __getitem__(self, key):
        if any(True for _ in _arrays_in(key if isinstance(key, tuple) else (key,))):
            _record("take", (self, key))  # advanced indexing gathers with a kernel
            return ndarray(self._buffer[_host(key)], state.device)
        return self._view(self._buffer[key])

    def __setitem__(self, key, value):
        _record("setitem", (self, key, value))
        self._buffer[_host(key)] = _host(value)

    def fill(self, value):
        _record("fill", (self,))
        self._buffer.fill(value)

    def get(self):
        # CuPy's get() switches to the array's device itself
        return self._buffer.copy()

    def __dlpack_device__(self):
        return (_KDL_CUDA, self.device.id)

    def __dlpack__(self, stream=None, **kwargs):
        # CuPy orders the consumer's stream after the current stream: the exporting
        # call's context must be current
        _record("dlpack export", (self,))
        return self._buffer.__dlpack__()

    def __iadd__(self, other):
        _record("iadd", (self, other))
        self._buffer += _host(other)
        return self

    conj = _device_op("conj", np.conj)
    sum = _device_op("sum", np.sum)
    __mul__ = _device_op("multiply", np.multiply)
    __add__ = _device_op("add", np.add)


ndarray.__module__ = "cupy"  # cuconv recognises CuPy arrays by their type's module


def _new_array(name, function):
    def make(*args, **kwargs):
        _record(name, args)
        return ndarray(function(*(_host(a) for a in args), **kwargs), state.device)

    return make


empty = _new_array("empty", np.empty)
zeros = _new_array("zeros", np.zeros)
ascontiguousarray = _new_array("ascontiguousarray", lambda a: np.array(a, order="C", copy=True))


def asarray(a):
    if isinstance(a, ndarray):
        _check_device(a.device.id, "the array asarray was given")
        return a
    _record("asarray")
    return ndarray(np.array(a, copy=True), state.device)


matmul = _device_op("matmul", np.matmul)

# cuFFT and scipy's pocketfft differ in rounding; the fake uses scipy's so that its
# results equal the interpret backend's bit for bit.
rfft2, irfft2 = _device_op("rfft2", scipy.fft.rfft2), _device_op("irfft2", scipy.fft.irfft2)


# --- kernels ---

class CPointer:
    def __init__(self, ptr: int = 0):
        self.ptr = ptr


def _kernel_module(code: str):
    from cuconv.check import all_modules

    for module in all_modules():
        if module.source() == code:
            return module
    raise RuntimeError("fake cupy: RawModule code is no cuconv kernel module")


class RawModule:
    def __init__(self, code: str, options=(), name_expressions=None):
        self.kernels = _kernel_module(code)
        self.name_expressions = tuple(name_expressions or ())
        self._loaded = {}

    @property
    def module(self):
        """Compiled and loaded on the current device (once per device, as CuPy memoizes)."""
        if state.device not in self._loaded:
            state.loads.append((self.kernels.filename, state.device))
            self._loaded[state.device] = _Module(self.kernels, self.name_expressions, state.device)
        return self._loaded[state.device]

    def get_function(self, name: str):
        # as CuPy's: a fresh kernel, resolved on whatever device is current
        module = self.module
        return module.get_function(module.mapping.get(name, name))


class _Module:
    def __init__(self, kernels, name_expressions, device: int):
        self.kernels, self.device = kernels, device
        self.mapping = {name: f"_Z{len(name)}{name}" for name in name_expressions}  # stand-ins for mangled names

    def get_function(self, mangled: str):
        names = {v: k for k, v in self.mapping.items()}
        if mangled not in names:
            raise RuntimeError(f"fake cupy: CUDA_ERROR_NOT_FOUND: no function {mangled!r} in {self.kernels.filename}")
        state.resolutions.append((self.kernels.filename, self.device, names[mangled]))
        return _Function(self.kernels, names[mangled], self.device)


class _Function:
    def __init__(self, kernels, name_expression: str, device: int):
        self.kernels, self.name_expression, self.device = kernels, name_expression, device

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        _check_device(self.device, f"the module of {self.name_expression}")
        stream = state.current_stream() if stream is None else stream
        if stream.device_id not in (-1, self.device):
            raise RuntimeError(f"fake cupy: {self.name_expression} launched on a stream of device {stream.device_id}")
        params, *arrays = args
        addresses = []
        for a in arrays:
            if isinstance(a, ndarray):
                _check_device(a.device.id, f"an argument of {self.name_expression}")
                addresses.append(a._buffer.ctypes.data)
            elif isinstance(a, (int, np.integer)) and a == 0:
                addresses.append(None)
            else:
                raise TypeError(f"fake cupy: {self.name_expression}: unsupported argument {type(a).__name__}")
        state.log.append((f"launch {self.name_expression}", state.device, stream.ptr))
        from cuconv import _interpret

        _interpret.launch_addresses(self.kernels, self.name_expression, grid, block, shared_mem, params.ptr, addresses)


# --- installation ---

def install(monkeypatch) -> _State:
    """Puts a fresh fake CuPy in sys.modules for the test; returns its state (the logs)."""
    global state
    state = _State()
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device, cuda.Stream, cuda.ExternalStream, cuda.Event = Device, Stream, ExternalStream, Event
    cuda.get_current_stream, cuda.get_elapsed_time = get_current_stream, get_elapsed_time
    cuda.runtime = _Runtime()
    cuda.function = types.ModuleType("cupy.cuda.function")
    cuda.function.CPointer = CPointer
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cupy.cuda, cupy.ndarray, cupy.RawModule = cuda, ndarray, RawModule
    cupy.empty, cupy.zeros, cupy.asarray, cupy.ascontiguousarray = empty, zeros, asarray, ascontiguousarray
    cupy.matmul = matmul
    cupy.fft = types.ModuleType("cupy.fft")
    cupy.fft.rfft2, cupy.fft.irfft2 = rfft2, irfft2
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.function", cuda.function),
                         ("cupy.fft", cupy.fft)):
        monkeypatch.setitem(sys.modules, name, module)
    return state
