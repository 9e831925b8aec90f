"""Compile CUDA C++ to a cubin with NVRTC, without a GPU.

CuPy's compile API (``RawModule``/``compile_with_cache``) needs a device and a
driver context, but the kernels must be compile-checked (and their register /
spill / shared-memory use inspected) on CI machines that have neither.  NVRTC
itself is a pure host library, so this module drives ``libnvrtc`` through
``ctypes`` using only the pip wheels ``nvidia-cuda-nvrtc-cu12`` (the compiler)
and ``nvidia-cuda-runtime-cu12`` (``cuda_fp16.h``, ``cuda_bf16.h``, ...).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CompileResult", "KernelResources", "NvrtcError", "NvrtcUnavailable",
    "compile_to_cubin", "kernel_resources", "nvrtc_version", "parse_ptxas_log", "runtime_include_dir",
]

_NVRTC_PKG = "nvidia-cuda-nvrtc-cu12"
_RUNTIME_PKG = "nvidia-cuda-runtime-cu12"
_NVRTC_SUCCESS = 0
_NVRTC_ERROR_INVALID_OPTION = 5
_PTXAS_VERBOSE = "--ptxas-options=-v"


class NvrtcUnavailable(RuntimeError):
    """libnvrtc or the CUDA headers could not be found."""


class NvrtcError(RuntimeError):
    """An NVRTC call (usually the compilation) failed; ``.log`` is the program log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


@dataclass(frozen=True)
class KernelResources:
    registers: int | None
    spill_stores: int | None  # bytes
    spill_loads: int | None  # bytes
    shared_bytes: int | None  # static shared memory


@dataclass(frozen=True)
class CompileResult:
    arch: str
    cubin: bytes
    log: str
    lowered_names: dict[str, str]  # name expression -> mangled name
    resources: dict[str, KernelResources]  # keyed by name expression


# --------------------------------------------------------------------------- loading

def _package_dirs(module: str) -> list[Path]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    # The nvidia.* wheels are namespace packages: no __file__, only __path__.
    return [Path(p) for p in getattr(mod, "__path__", [])]


def _candidate_libs() -> list[str]:
    candidates = []
    for d in _package_dirs("nvidia.cuda_nvrtc"):
        candidates += [str(p) for p in sorted((d / "lib").glob("libnvrtc.so.12*"))]
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    return candidates


def _preload_builtins(lib_path: str) -> None:
    # NVRTC dlopen()s libnvrtc-builtins by soname at compile time.  The wheel's
    # RPATH normally finds it, but loading it globally first makes that lookup
    # succeed even when the wheel directory is not on any search path.
    builtins = sorted(Path(lib_path).parent.glob("libnvrtc-builtins.so.*"))
    if builtins:
        try:
            ctypes.CDLL(str(builtins[0]), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # NVRTC reports a clearer error at compile time


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    explicit = os.environ.get("CUCONV_NVRTC_LIB")
    # An explicit path is a deliberate choice; silently using another library
    # would hide a misconfiguration, so it is the only candidate when set.
    candidates = [explicit] if explicit else _candidate_libs()
    errors = []
    for path in candidates:
        try:
            if os.path.isabs(path):
                _preload_builtins(path)
            lib = ctypes.CDLL(path)
            break
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    else:
        where = f"CUCONV_NVRTC_LIB={explicit!r}" if explicit else "the nvidia.cuda_nvrtc package or the system"
        raise NvrtcUnavailable(
            f"libnvrtc not found via {where}; install it with `pip install {_NVRTC_PKG}`"
            + ("".join(f"\n  {e}" for e in errors))
        )

    P, c_int_p, c_size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t)
    c_str_arr = ctypes.POINTER(ctypes.c_char_p)
    signatures = {
        "nvrtcGetErrorString": ([ctypes.c_int], ctypes.c_char_p),
        "nvrtcVersion": ([c_int_p, c_int_p], ctypes.c_int),
        "nvrtcCreateProgram": ([ctypes.POINTER(P), ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_int, c_str_arr, c_str_arr], ctypes.c_int),
        "nvrtcDestroyProgram": ([ctypes.POINTER(P)], ctypes.c_int),
        "nvrtcAddNameExpression": ([P, ctypes.c_char_p], ctypes.c_int),
        "nvrtcCompileProgram": ([P, ctypes.c_int, c_str_arr], ctypes.c_int),
        "nvrtcGetProgramLogSize": ([P, c_size_p], ctypes.c_int),
        "nvrtcGetProgramLog": ([P, ctypes.c_char_p], ctypes.c_int),
        "nvrtcGetCUBINSize": ([P, c_size_p], ctypes.c_int),
        "nvrtcGetCUBIN": ([P, ctypes.c_char_p], ctypes.c_int),
        "nvrtcGetLoweredName": ([P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _check(rc: int, what: str, log: str = "") -> None:
    if rc != _NVRTC_SUCCESS:
        msg = (_lib().nvrtcGetErrorString(rc) or b"unknown error").decode()
        raise NvrtcError(f"{what} failed: {msg} ({rc})", log)


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def runtime_include_dir() -> str:
    for d in _package_dirs("nvidia.cuda_runtime"):
        inc = d / "include"
        if (inc / "cuda_fp16.h").is_file():
            return str(inc)
    raise NvrtcUnavailable(
        f"CUDA runtime headers (cuda_fp16.h) not found; install them with `pip install {_RUNTIME_PKG}`"
    )


# --------------------------------------------------------------------------- resources

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores,\s*(\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Map mangled function name -> resources from ``ptxas -v`` output."""
    stats: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        # Both headers switch context: the "Function properties" block of a
        # non-inlined device function must not be booked to the previous kernel.
        if m := (_ENTRY_RE.search(line) or _PROPS_RE.search(line)):
            current = m.group(1)
            stats.setdefault(current, {})
            continue
        if current is None:
            continue
        if m := _SPILL_RE.search(line):
            stats[current]["spill_stores"] = int(m.group(1))
            stats[current]["spill_loads"] = int(m.group(2))
        if m := _REGS_RE.search(line):
            smem = _SMEM_RE.search(line)
            stats[current]["registers"] = int(m.group(1))
            # ptxas omits "N bytes smem" when the kernel uses none.
            stats[current]["shared_bytes"] = int(smem.group(1)) if smem else 0
    return {name: KernelResources(s.get("registers"), s.get("spill_stores"),
                                  s.get("spill_loads"), s.get("shared_bytes"))
            for name, s in stats.items()}


_EIATTR_REGCOUNT = 0x2F
_EIFMT_SVAL = 0x04


def _cubin_register_counts(cubin: bytes) -> dict[str, int]:
    """Register count per kernel read from the cubin ELF (no ptxas log needed).

    Newer cubins (sm_90 with CUDA 12.x) record it as EIATTR_REGCOUNT in the
    global ``.nv.info`` section; older ones keep it in the top byte of the
    ``.text.<name>`` section's sh_info.  Both are read; .nv.info wins.
    """
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:  # only 64-bit cubins exist
        return {}
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off: int) -> str:
        return cubin[off:cubin.index(b"\0", off)].decode(errors="replace")

    def data(h) -> bytes:
        return cubin[h[4]:h[4] + h[5]]

    names = [cstr(shdrs[shstrndx][4] + h[0]) for h in shdrs]
    regs: dict[str, int] = {}
    for name, h in zip(names, shdrs):
        if name.startswith(".text.") and h[7] >> 24:
            regs[name[len(".text."):]] = h[7] >> 24

    symtab = next((h for h in shdrs if h[1] == 2), None)  # SHT_SYMTAB
    info = next((h for n, h in zip(names, shdrs) if n == ".nv.info"), None)
    if symtab is None or info is None:
        return regs
    strtab_off = shdrs[symtab[6]][4]
    syms = data(symtab)
    blob, pos = data(info), 0
    while pos + 4 <= len(blob):
        fmt, attr, size = struct.unpack_from("<BBH", blob, pos)
        if fmt != _EIFMT_SVAL:  # other formats carry their 2-byte value inline
            pos += 4
            continue
        if attr == _EIATTR_REGCOUNT and size >= 8:
            sym_index, count = struct.unpack_from("<II", blob, pos + 4)
            st_name, = struct.unpack_from("<I", syms, sym_index * 24)
            regs[cstr(strtab_off + st_name)] = count
        pos += 4 + size
    return regs


# --------------------------------------------------------------------------- compile

def _program_log(lib: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    _check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
    buf = ctypes.create_string_buffer(size.value)
    _check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.value.decode(errors="replace")


def _compile_once(source: str, name_expressions: list[str], opts: list[str], program_name: str):
    lib = _lib()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), program_name.encode(),
                                  0, None, None), "nvrtcCreateProgram")
    try:
        # Templates are only instantiated if their name expressions are
        # registered before compiling.
        for expr in name_expressions:
            _check(lib.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr!r})")
        c_opts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        rc = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        log = _program_log(lib, prog)
        if rc != _NVRTC_SUCCESS:
            return rc, log, b"", {}
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize", log)
        if size.value == 0:
            raise NvrtcError("NVRTC produced no cubin (is the arch a real sm_XX?)", log)
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN", log)
        lowered = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)),
                   f"nvrtcGetLoweredName({expr!r})", log)
            lowered[expr] = out.value.decode()  # copied: the pointer dies with the program
        return rc, log, cubin.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_to_cubin(source: str, name_expressions: list[str], arch: str = "sm_90",
                     include_dirs: list[str] = (), options: list[str] = (),
                     program_name: str = "kernel.cu") -> CompileResult:
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"arch must be a real architecture like 'sm_90' (got {arch!r}); "
                         "a virtual compute_XX arch yields PTX, not a cubin")
    name_expressions = list(name_expressions)
    opts = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{runtime_include_dir()}",
            *(f"-I{d}" for d in include_dirs), _PTXAS_VERBOSE, *options]
    rc, log, cubin, lowered = _compile_once(source, name_expressions, opts, program_name)
    if rc == _NVRTC_ERROR_INVALID_OPTION:
        # An NVRTC too old for --ptxas-options still compiles; the ELF
        # fallback below then supplies register counts.
        opts.remove(_PTXAS_VERBOSE)
        rc, log, cubin, lowered = _compile_once(source, name_expressions, opts, program_name)
    _check(rc, f"nvrtcCompileProgram({program_name}, {arch})", log)
    return CompileResult(arch=arch, cubin=cubin, log=log, lowered_names=lowered,
                         resources=kernel_resources(log, cubin, lowered))


def kernel_resources(log: str, cubin: bytes, lowered: dict[str, str]) -> dict[str, KernelResources]:
    """Resources per name expression, from the ``ptxas -v`` log of a compile, with
    register counts from the cubin where the log has none; `lowered` maps each name
    expression to its mangled name."""
    from_log = parse_ptxas_log(log)
    from_elf = _cubin_register_counts(cubin)
    resources = {}
    for expr, mangled in lowered.items():
        res = from_log.get(mangled, KernelResources(None, None, None, None))
        if res.registers is None and mangled in from_elf:
            res = KernelResources(from_elf[mangled], res.spill_stores, res.spill_loads, res.shared_bytes)
        resources[expr] = res
    return resources
