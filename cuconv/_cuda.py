"""The `cuda` backend: kernels_cu/*.cu compiled by NVRTC through cupy.RawModule.

One RawModule per kernel module; CuPy compiles and loads it once per device.
Template instantiations are requested with `name_expressions` so one compile serves
every shape and dtype. CuPy >= 14.2 also caches such modules on disk across processes,
keyed by the code text, which contains every project header inlined
(_kernels.KernelModule.source), so editing a header invalidates it.
"""

from __future__ import annotations

import functools

import numpy as np

from ._kernels import KernelModule


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - exercised only without cupy
        raise RuntimeError("cuconv cuda backend needs CuPy: pip install 'cuconv[cuda12]' (or [cuda13])") from e
    return cupy


def _options() -> tuple[str, ...]:
    options = ["-std=c++17"]
    if _cupy().cuda.runtime.runtimeGetVersion() // 1000 == 12:
        # cuda_fp16.h / cuda_bf16.h from the nvidia-cuda-runtime-cu12 wheel, for a CuPy
        # whose toolkit lookup finds no headers; only for a CUDA 12 CuPy, never mixed
        # into another major version's NVRTC.
        try:
            from ._nvrtc import runtime_include_dir

            options.append("-I" + runtime_include_dir())
        except Exception:
            pass
    return tuple(options)


@functools.cache
def _module(module: KernelModule):
    return _cupy().RawModule(code=module.source(), options=_options(), name_expressions=module.name_expressions)


@functools.cache
def _function(module: KernelModule, device_id: int, name_expression: str):
    """The launchable instantiation on `device_id`, resolved once: RawModule.get_function
    would build a RawKernel and look the function up again on every launch, and on
    whatever device is current rather than the arrays' device."""
    with _cupy().cuda.Device(device_id):
        compiled = _module(module).module  # compiles (or reads CuPy's cache) and loads on device_id
        return compiled.get_function(compiled.mapping[name_expression])


@functools.cache
def max_shared_bytes(device_id: int) -> int:
    cupy = _cupy()
    return int(cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlock"])


def launch(module: KernelModule, kernel: str, dtype: str, grid, block, shared_bytes: int,
           params: np.ndarray, arrays: list, device_id: int, stream) -> None:
    """Runs one kernel on `stream`: `arrays` are CuPy arrays on `device_id` (or None)."""
    # cuLaunchKernel takes the argument count on trust: check it against the kernel's
    # parameter list (read from the .cu text) before anything is compiled or launched.
    module.check_arity(kernel, len(arrays))
    cupy = _cupy()
    from cupy.cuda.function import CPointer

    fn = _function(module, device_id, module.name_expression(kernel, dtype))
    # cuLaunchKernel takes a pointer to each argument's bytes; for the by-value params
    # struct that is the address of the int64 array (alive until the launch returns,
    # and the driver copies the bytes at launch). A null pointer goes as a 64-bit 0.
    params = np.ascontiguousarray(params, dtype=np.int64)
    args = (CPointer(params.ctypes.data), *(np.uint64(0) if a is None else a for a in arrays))
    with cupy.cuda.Device(device_id):  # the module's context must be current at launch
        fn(tuple(grid), tuple(block), args, shared_mem=shared_bytes, stream=stream)
