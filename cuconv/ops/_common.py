"""What every op shares: importing its arrays, checking them against each other,
choosing the backend, launching kernels and handing results back.

An op body reads:  call = Call(op, input=x, weight=w, ...)  -> validate shapes ->
call.empty(...) for outputs -> call.launch(...) -> call.export(out).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from numbers import Integral

import numpy as np

from .. import _arrays
from .._arrays import Array
from .._kernels import KernelModule

BACKENDS = ("cuda", "interpret")
_MAX_GRID = 2**31 - 1


def forced_backend() -> str | None:
    """The backend CUCONV_BACKEND names, or None for the natural one (by device)."""
    value = os.environ.get("CUCONV_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"CUCONV_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


# The complex dtype that pairs with a real one (docs/design.md §1): a complex argument (named in
# Call's complex_args) must have the pairing type of the call's real dtype. float16 and
# bfloat16 pair with complex64 (ops with complex arguments compute those in float32).
COMPLEX_PARTNER = {"float16": "complex64", "bfloat16": "complex64", "float32": "complex64",
                   "float64": "complex128"}


class Call:
    """One invocation of an op. The first array argument (`input`) decides the
    framework and device of the results; arguments not named in `optional` must
    not be None. Arguments named in `complex_args` must be complex, of the type that
    pairs with the (shared) dtype of the real arguments (COMPLEX_PARTNER); every other
    argument must be real."""

    def __init__(self, op: str, optional: tuple[str, ...] = (), complex_args: tuple[str, ...] = (), **arrays):
        self.op = op
        for name, obj in arrays.items():
            if obj is None and name not in optional:
                raise TypeError(f"{op}: {name} must be an array, got None")
        imported = {name: _arrays.import_array(op, name, obj, allow_complex=name in complex_args)
                    for name, obj in arrays.items() if obj is not None}
        self.anchor = imported[next(iter(arrays))]
        dtypes = {a.dtype for n, a in imported.items() if n not in complex_args}
        if len(dtypes) > 1:
            listing = ", ".join(f"{n} {a.dtype}" for n, a in imported.items())
            raise TypeError(f"{op}: all arrays must share one dtype; got {listing}")
        for name in complex_args:
            a = imported.get(name)
            if a is not None and a.dtype != COMPLEX_PARTNER[self.anchor.dtype]:
                listing = ", ".join(f"{n} {b.dtype}" for n, b in imported.items())
                raise TypeError(f"{op}: {name} must be {COMPLEX_PARTNER[self.anchor.dtype]} to pair with "
                                f"{self.anchor.dtype} arrays (complex64 with float16/bfloat16/float32, "
                                f"complex128 with float64); got {listing}")
        devices = {a.device for a in imported.values()}
        if len(devices) > 1:
            listing = ", ".join(f"{n} on {a.device_name}" for n, a in imported.items())
            raise ValueError(f"{op}: all arrays must be on one device; got {listing}")
        self.dtype = self.anchor.dtype
        natural = "interpret" if self.anchor.on_host else "cuda"
        self.backend = forced_backend() or natural
        self.device_id = self.anchor.device[1] if not self.anchor.on_host else 0
        self._arrays = imported
        self._stream = None

    def shape(self, name: str) -> tuple[int, ...] | None:
        a = self._arrays.get(name)
        return None if a is None else a.shape

    def operand(self, name: str) -> Array | None:
        """The named argument where the kernels run, C-contiguous (copied only if it was not)."""
        a = self._arrays.get(name)
        if a is None:
            return None
        if a.framework == "torch" and not a.data.flags.c_contiguous:
            # torch copies on its current stream into its caching allocator (which
            # torch.cuda.graph capture requires), and keeps the copy alive as a tensor
            _arrays.record_allocation(a.shape, a.dtype)
            a = _arrays.import_array(self.op, name, a.original.detach().contiguous(), allow_complex=True)
        with self.on_device():
            a = _arrays.to_host(a) if self.backend == "interpret" else _arrays.to_device(a, self.device_id)
            if not a.data.flags.c_contiguous:
                _arrays.record_allocation(a.shape, a.dtype)
                xp = np if a.on_host else _cupy()
                a = Array(xp.ascontiguousarray(a.data), a.dtype, a.framework, a.device, a.original)
        return a

    def empty(self, shape, dtype: str | None = None) -> Array:
        """A new array (dtype: the call's, or e.g. a complex or accumulator dtype)."""
        with self.on_device():
            return _arrays.empty(self.anchor, shape, on_host=self.backend == "interpret", dtype=dtype)

    @property
    def accumulator_bytes(self) -> int:
        return 8 if self.dtype == "float64" else 4

    def max_shared_bytes(self) -> int:
        if self.backend == "interpret":
            from .._interpret import MAX_SHARED_BYTES

            return MAX_SHARED_BYTES
        from .._cuda import max_shared_bytes

        return max_shared_bytes(self.device_id)

    def launch(self, module: KernelModule, kernel: str, work_items: int, block: int, params: dict,
               *arrays: Array | None, shared_bytes: int = 0) -> None:
        """One kernel over `work_items` block-sized items (grid-stride: any count is valid)."""
        if work_items <= 0:
            return
        grid = (min(work_items, _MAX_GRID), 1, 1)
        packed = module.params(**params)
        data = [None if a is None else a.data for a in arrays]
        if self.backend == "interpret":
            from .. import _interpret

            _interpret.launch(module, kernel, self.dtype, grid, (block, 1, 1), shared_bytes, packed, data)
        else:
            from .. import _cuda

            _cuda.launch(module, kernel, self.dtype, grid, (block, 1, 1), shared_bytes, packed, data,
                         self.device_id, self.stream())

    def stream(self):
        """The caller's current stream on the call's device: torch's for torch CUDA
        tensors, CuPy's otherwise."""
        if self._stream is None:
            if self.anchor.framework == "torch" and not self.anchor.on_host:
                import torch

                self._stream = _arrays.external_stream(torch.cuda.current_stream(self.anchor.original.device))
            else:
                self._stream = _cupy().cuda.get_current_stream(self.device_id)
        return self._stream

    def on_device(self):
        """A context in which CuPy's current device and stream are the call's, so CuPy's
        copies, allocations, fills and FFTs land on the arrays' GPU, ordered with the
        call's kernels. Nothing to set when no CuPy array takes part."""
        if self.backend == "interpret" and self.anchor.on_host:
            return contextlib.nullcontext()
        return _arrays.on_cupy_device(self.device_id, self.stream())

    def export(self, out: Array | None):
        if out is None:
            return None
        with self.on_device():  # a DLPack export orders its consumer after CuPy's current stream
            return _arrays.export(out, self.anchor)


def describe_shapes(call, names) -> str:
    """'input (2, 3, 8, 8), weight (...)' for the named arguments that are present: the
    shapes an error message shows (call: a Call, or anything with .shape(name))."""
    return ", ".join(f"{n} {call.shape(n)}" for n in names if call.shape(n) is not None)


def accepts_unbatched(rank: int):
    """Decorates an op (or its backward) whose `input` may also be one sample without the
    batch dimension, a `rank`-D array, as torch's conv2d and conv_transpose2d take: that
    input (and a backward's grad_output) runs as a batch of one, and the result (a
    backward's grad_input) comes back without the batch dimension. Every framework's
    arrays index as x[None] and y[0]. The registry reads `unbatched_rank` for shapes."""

    def decorate(function):
        backward = function.__name__.endswith("_backward")
        position = 1 if backward else 0  # input's position: after grad_output in a backward

        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args, **kwargs):
            x = args[position] if len(args) > position else kwargs.get("input")
            shape = tuple(getattr(x, "shape", ()))
            if len(shape) not in (rank, rank + 1) and x is not None and hasattr(x, "shape"):
                raise ValueError(f"{function.__name__}: input must be {rank + 1}-D [batch, channels, ...] or {rank}-D "
                                 f"(one sample without the batch dimension), got shape {shape}")
            if len(shape) != rank:
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.arguments["input"] = x[None]
            if not backward:
                return function(*bound.args, **bound.kwargs)[0]
            bound.arguments["grad_output"] = bound.arguments["grad_output"][None]
            grad_input, *rest = function(*bound.args, **bound.kwargs)
            return (None if grad_input is None else grad_input[0], *rest)

        run.unbatched_rank = rank
        return run

    return decorate


def checked_output_size(op: str, size, kernel, stride, pad, dilation, shapes: str) -> tuple[int, int]:
    """(Ho, Wo) of a sliding window over `size` (H, W) padded by `pad` on both sides;
    ValueError when the dilated kernel is larger than the padded input."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = size, kernel, stride, pad, dilation
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: the output would be {out_h}x{out_w}: the kernel (dilated extent "
                         f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}) is larger than the padded input "
                         f"{h + 2 * ph}x{w + 2 * pw} ({shapes}, padding {tuple(pad)}, dilation {tuple(dilation)})")
    return out_h, out_w


def check_rank(op: str, name: str, shape, rank: int, layout: str) -> tuple[int, ...]:
    """`shape` as a tuple when it has `rank` dimensions; else ValueError naming `name`
    and its expected layout, e.g. "[batch, in_channels, height, width]"."""
    if len(shape) != rank:
        raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got shape {shape}")
    return tuple(shape)


def check_grouped_channels(op: str, weight: str, cin: int, cin_g: int, cout: int, groups: int, out_name: str,
                           shapes: str) -> None:
    """A grouped conv's channel rules (torch's): the input's channels are `weight`'s
    in_channels/groups times groups, and its `out_name` channels divide into groups."""
    if cin != cin_g * groups:
        raise ValueError(f"{op}: input has {cin} channels but {weight} expects in_channels/groups={cin_g} "
                         f"x groups={groups} = {cin_g * groups} {shapes}")
    if cout % groups:
        raise ValueError(f"{op}: {weight}'s {out_name}={cout} is not divisible by groups={groups} {shapes}")


def check_grad_output(op: str, call: Call, expected) -> None:
    """grad_output must have the forward output's shape (ValueError naming the shapes)."""
    got = call.shape("grad_output")
    if got != tuple(expected):
        raise ValueError(f"{op}: grad_output must have the forward output's shape {tuple(expected)}, "
                         f"got {got} ({describe_shapes(call, ('input', 'weight'))})")


def _cupy():
    import cupy

    return cupy


def threads_for(n: int, max_threads: int = 256) -> int:
    """A block size for n items of parallel work: a multiple of 32, at most max_threads."""
    return max(32, min(max_threads, -(-n // 32) * 32))


# --- parameter parsing shared by the convolution-like ops ---

def int_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair; ValueError/TypeError naming `name`."""
    items = (value, value) if isinstance(value, Integral) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{op}: {name} must be {bound}, got {value!r}")
    return int(items[0]), int(items[1])


def positive_int(op: str, name: str, value) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be positive, got {value}")
    return int(value)


def parse_wrt(op: str, wrt, names: tuple[str, ...]) -> frozenset[str]:
    """The set of argument names to differentiate with respect to (None = all)."""
    if wrt is None:
        return frozenset(names)
    if isinstance(wrt, str):
        wrt = (wrt,)
    unknown = [w for w in wrt if w not in names]
    if unknown:
        raise ValueError(f"{op}: wrt names unknown arguments {unknown}; choose from {list(names)}")
    return frozenset(wrt)
