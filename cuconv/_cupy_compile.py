"""Compile kernel modules through CuPy's own compile path, without a GPU
(`cuconv check --via cupy`).

The cuda backend hands each .cu file to `cupy.RawModule`, which compiles it in
`cupy._core.core.compile_with_cache`: CuPy assembles the options (its C++ standard, its
bundled CCCL and own headers, the CUDA headers cuda-pathfinder finds), appends its own,
then NVRTC compiles and lowers the template name expressions. Only one step of that
asks for a device: the arch probe, whose memo is keyed on cudaGetDevice. Here it is
replaced, while the compiles run, by one that answers the target arch; the rest is
CuPy's code. What is skipped is loading the cubin into a context.

Those functions are private to CuPy, so only the CuPy versions they were read from are
accepted (SUPPORTED).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ._nvrtc import CompileResult, NvrtcError, kernel_resources

SUPPORTED = ((14, 2),)  # (major, minor) of the CuPy releases whose private names are used

# Appended by CuPy's compile_with_cache after assembling the options (14.2).
_CUPY_APPENDS = ("-ftz=true",)
# Only for the report: ptxas prints registers, spills and smem; the code is unchanged.
_PTXAS_VERBOSE = "--ptxas-options=-v"


class CupyUnavailable(RuntimeError):
    """CuPy is missing or unsupported, or its toolchain is incomplete or mixed."""


@dataclass(frozen=True)
class Toolchain:
    cupy: str  # CuPy's version
    cuda_major: int  # the CUDA major version CuPy was built for
    nvrtc: tuple[int, int]
    nvrtc_path: str
    headers: str  # the directory NVRTC reads the CUDA headers from
    headers_version: tuple[int, int] | None

    def describe(self) -> str:
        headers = "CUDA headers" + (" {}.{}".format(*self.headers_version) if self.headers_version else "")
        return (f"CuPy {self.cupy} for CUDA {self.cuda_major}; NVRTC {self.nvrtc[0]}.{self.nvrtc[1]} "
                f"({self.nvrtc_path}); {headers} ({self.headers})")


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise CupyUnavailable("cuconv check --via cupy needs CuPy 14.2: pip install '.[cuda12]' or '.[cuda13]'") from e
    found = tuple(int(x) for x in re.findall(r"\d+", cupy.__version__)[:2])
    if found not in SUPPORTED:
        wanted = " or ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        raise CupyUnavailable(
            f"cuconv check --via cupy drives CuPy's private compile functions "
            f"(cupy.cuda.compiler._get_arch_for_options_for_nvrtc, compile_using_nvrtc, "
            f"cupy._core.core.assemble_cupy_compiler_options) as they are in CuPy {wanted}; "
            f"this is CuPy {cupy.__version__}. Install CuPy {wanted}, or use plain `cuconv check`.")
    from cupy._core import core
    from cupy.cuda import compiler

    return cupy, core, compiler


def options() -> tuple[str, ...]:
    """The NVRTC options RawModule compiles cuconv's modules with, less the arch and the
    two that compile_using_nvrtc adds itself."""
    from . import _cuda

    _, core, _ = _cupy()
    return core.assemble_cupy_compiler_options(_cuda._options()) + _CUPY_APPENDS


def _headers(opts) -> tuple[str, tuple[int, int] | None]:
    # NVRTC takes a header from the first -I directory that has it.
    for o in opts:
        path = os.path.join(o[2:], "cuda_runtime_api.h") if o.startswith("-I") else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
            return o[2:], (int(m.group(1)) // 1000, int(m.group(1)) % 1000 // 10) if m else None
    raise CupyUnavailable("no CUDA headers (cuda_runtime_api.h) on CuPy's include path; "
                          "install them with CuPy's [ctk] extra or cuda-toolkit[cudart]")


def toolchain() -> Toolchain:
    """CuPy, the NVRTC it loads and the CUDA headers it compiles against; CupyUnavailable
    when NVRTC or the headers are missing or of another CUDA major version than CuPy."""
    cupy, _, compiler = _cupy()
    cuda_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    try:
        nvrtc = tuple(compiler._get_nvrtc_version())
        from cuda.pathfinder import load_nvidia_dynamic_lib  # what CuPy loads NVRTC with

        nvrtc_path = load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception as e:
        raise CupyUnavailable(f"CuPy {cupy.__version__} finds no NVRTC ({type(e).__name__}: {str(e).strip()}); "
                              f"install it with CuPy's [ctk] extra or cuda-toolkit[nvrtc]") from e
    headers, headers_version = _headers(options())
    tc = Toolchain(cupy.__version__, cuda_major, nvrtc, nvrtc_path, headers, headers_version)
    # A CuPy for one CUDA major with another major's NVRTC or headers compiles, but makes
    # cubins its users' driver may not load: that is a broken install, not a result.
    if nvrtc[0] != cuda_major or (headers_version and headers_version[0] != cuda_major):
        raise CupyUnavailable(f"mixed CUDA versions: {tc.describe()}")
    return tc


def _arch_option(arch=None):
    # CuPy's answer on a device of this arch with an NVRTC that knows it: SASS (a cubin),
    # which is also what the resource report is read from.
    if arch is None:
        raise RuntimeError("no device here: the arch must be given")
    return f"-arch=sm_{arch}", "cubin"


@contextlib.contextmanager
def _without_device(compiler):
    probe = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = _arch_option
    try:
        yield
    finally:
        compiler._get_arch_for_options_for_nvrtc = probe


def _compile_one(compiler, opts, source, name_expressions, arch, program_name) -> CompileResult:
    log = io.StringIO()
    try:
        cubin, lowered = compiler.compile_using_nvrtc(
            source, opts + (_PTXAS_VERBOSE,), arch=arch.removeprefix("sm_"), filename=program_name,
            name_expressions=list(name_expressions), log_stream=log)
    except compiler.CompileException as e:
        raise NvrtcError(f"CuPy's compile of {program_name} for {arch} failed", e.get_message()) from None
    if cubin[:4] != b"\x7fELF":
        raise NvrtcError(f"CuPy returned no cubin for {program_name} ({arch})")
    lowered = dict(lowered or {})  # CuPy gives None for a program without name expressions
    return CompileResult(arch, cubin, log.getvalue(), lowered, kernel_resources(log.getvalue(), cubin, lowered))


def compile_all(jobs, workers: int = 1) -> list[CompileResult]:
    """Compile each (source, name_expressions, arch, program_name) of `jobs` the way
    RawModule does; results in the order of `jobs`. NVRTC runs without the GIL, so
    `workers` threads compile side by side. Raises NvrtcError (with the log) for a
    failed compile, CupyUnavailable when CuPy cannot compile here."""
    _, _, compiler = _cupy()
    opts = options()
    # The probe is swapped once around all threads: swapping it per compile would let
    # one thread put the device probe back while another is about to call it.
    with _without_device(compiler):
        # NVRTC 13.0 opens libnvrtc-builtins on its first compile, and two first compiles
        # at once can fail to ("failed to open libnvrtc-builtins.so.13.0"): one goes alone.
        if jobs:
            _compile_one(compiler, opts, "", (), jobs[0][2], "warm_up.cu")
        pool = ThreadPoolExecutor(max(1, workers))
        try:
            return list(pool.map(lambda job: _compile_one(compiler, opts, *job), jobs))
        finally:  # after a failure, compile nothing more; the probe returns once all threads are done
            pool.shutdown(cancel_futures=True)
