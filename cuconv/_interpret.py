"""The `interpret` backend: kernels_cu/*.cu compiled for the host and run on NumPy buffers.

The .cu text (headers inlined, see _kernels.KernelModule.source) is compiled by the
system C++ compiler with cuconv/interpret/cuda_emulation.h force-included, into a
shared library with one `extern "C"` launcher per template instantiation. Libraries
are cached on disk under $CUCONV_CACHE_DIR (default ~/.cache/cuconv) keyed by the
full text, the emulation header, the flags and the compiler's version, and loaded
once per process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ._kernels import KernelModule, arity_error

EMULATION_HEADER = Path(__file__).resolve().parent / "interpret" / "cuda_emulation.h"
# The shared memory a block may use, as on every NVIDIA GPU without an opt-in.
MAX_SHARED_BYTES = 48 * 1024
_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
          "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-w"]


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"cuconv interpret backend: C++ compiler {cxx!r} not found "
                           "(install g++ >= 12, or set CXX)")
    return cxx


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def cache_dir() -> Path:
    root = os.environ.get("CUCONV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cuconv")
    return Path(root) / "interpret"


def _wrapper_source(module: KernelModule) -> str:
    launchers = [
        f'extern "C" int cuconv_launch_{i}(const unsigned* grid, const unsigned* block, '
        f"unsigned long long shared_bytes, void** args, char* error, int error_bytes) {{\n"
        f"  return cuconv_emu::launch(&{name}, grid, block, shared_bytes, args, error, error_bytes);\n}}\n"
        f'extern "C" int cuconv_arity_{i}() {{ return cuconv_emu::kernel_arity(&{name}); }}\n'
        for i, name in enumerate(module.name_expressions)
    ]
    return module.source() + "\n" + "".join(launchers)


def _build(module: KernelModule) -> Path:
    cxx = compiler()
    source = _wrapper_source(module)
    key = hashlib.sha256("\0".join(
        [source, EMULATION_HEADER.read_text(), " ".join(_FLAGS), _compiler_version(cxx)]).encode()).hexdigest()[:24]
    target = cache_dir() / f"{Path(module.filename).stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cpp = Path(tmp) / (Path(module.filename).stem + ".cpp")
        cpp.write_text(source)
        built = Path(tmp) / "module.so"
        cmd = [cxx, *_FLAGS, "-include", str(EMULATION_HEADER), str(cpp), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cuconv interpret backend: compiling {module.filename} failed:\n{result.stderr}")
        os.replace(built, target)  # atomic: concurrent processes never see a partial file
    return target


@functools.cache
def _library(module: KernelModule):
    lib = ctypes.CDLL(str(_build(module)))
    launchers, arities = {}, {}
    for i, name in enumerate(module.name_expressions):
        fn = getattr(lib, f"cuconv_launch_{i}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong,
                       ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
        launchers[name] = fn
        arity = getattr(lib, f"cuconv_arity_{i}")
        arity.argtypes, arity.restype = [], ctypes.c_int
        arities[name] = arity()
    return lib, launchers, arities


def kernel_arity(module: KernelModule, kernel: str, dtype: str) -> int:
    """The parameter count of the compiled instantiation (params struct included)."""
    return _library(module)[2][module.name_expression(kernel, dtype)]


def launch(module: KernelModule, kernel: str, dtype: str, grid, block, shared_bytes: int,
           params: np.ndarray, arrays: list) -> None:
    """Runs one kernel: `arrays` are host NumPy arrays (or None for a null pointer)."""
    params = np.ascontiguousarray(params)
    launch_addresses(module, module.name_expression(kernel, dtype), grid, block, shared_bytes, params.ctypes.data,
                     [None if a is None else a.ctypes.data for a in arrays])


def launch_addresses(module: KernelModule, name_expression: str, grid, block, shared_bytes: int,
                     params_address: int, addresses: list) -> None:
    """Runs one instantiation on host addresses, as cuLaunchKernel takes them: the params
    struct's and each array argument's (None or 0 for a null pointer)."""
    kernel = name_expression.partition("<")[0]
    if shared_bytes > MAX_SHARED_BYTES:
        raise RuntimeError(f"{kernel}: {shared_bytes} bytes of shared memory exceed {MAX_SHARED_BYTES}")
    _, launchers, arities = _library(module)
    # The launcher reads one pointer per kernel parameter from args: a wrong count would
    # read past the array or leave a parameter unset, so it is refused here.
    if len(addresses) != arities[name_expression] - 1:
        raise arity_error(module, kernel, arities[name_expression] - 1, len(addresses))
    fn = launchers[name_expression]
    pointers = [ctypes.c_void_p(a or None) for a in addresses]
    # args[0] points at the struct itself; args[i > 0] each point at a pointer value.
    args = (ctypes.c_void_p * (1 + len(pointers)))(params_address, *(ctypes.addressof(p) for p in pointers))
    grid3 = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1))[:3])
    block3 = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1))[:3])
    error = ctypes.create_string_buffer(512)
    if fn(grid3, block3, shared_bytes, args, error, len(error)) != 0:
        raise RuntimeError(f"cuconv interpret backend: {name_expression}: {error.value.decode()}")
