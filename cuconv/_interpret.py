"""The `interpret` backend: kernels_cu/*.cu compiled for the host and run on NumPy buffers.

The .cu text (headers inlined, see _kernels.KernelModule.source) is compiled by the
system C++ compiler with cuconv/interpret/cuda_emulation.h force-included, into a
shared library with one `extern "C"` launcher per template instantiation. Libraries
are cached on disk under $CUCONV_CACHE_DIR (default ~/.cache/cuconv) keyed by the
full text, the emulation headers, the flags and the compiler's version, and loaded
once per process.

CUCONV_SANITIZE=memcheck,racecheck,initcheck (any subset, or `all`) switches launches to
an instrumented build of the same text (cuconv/interpret/sanitizer.h, docs/sanitize.md)
that checks every memory access of kernel code and raises SanitizerError on a finding.
`record_accesses` uses the same build to hand a profiler every access of a launch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._kernels import KernelModule, _split_top_level, arity_error

EMULATION_HEADER = Path(__file__).resolve().parent / "interpret" / "cuda_emulation.h"
_EMULATION_FILES = (EMULATION_HEADER.name, "sanitizer.h")  # not the lines a report should name
SANITIZER_HEADER = EMULATION_HEADER.parent / "sanitizer.h"
# The shared memory a block may use, as on every NVIDIA GPU without an opt-in.
MAX_SHARED_BYTES = 48 * 1024
_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
          "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-w"]
# The instrumented variant: g++ calls __asan_{load,store}*_noabort (defined by sanitizer.h)
# for every load and store of the kernel code; -g gives the line table of the reports;
# -fno-gnu-unique keeps each library's static __shared__ variables (template statics) in
# its own TLS block, where the sanitizers look for them, when two libraries define one.
_SANITIZE_FLAGS = ["-g", "-DCUCONV_SANITIZE_BUILD=1", "-fno-gnu-unique", "-fsanitize=kernel-address",
                   "--param", "asan-instrumentation-with-call-threshold=0", "-fsanitize-recover=kernel-address",
                   "--param", "asan-stack=0", "--param", "asan-globals=0"]
CHECKS = {"memcheck": 1, "racecheck": 2, "initcheck": 4}
_RECORD = 8


class SanitizerError(RuntimeError):
    """A CUCONV_SANITIZE check found a bad memory access in a kernel launch."""


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


def _wrapper_source(module: KernelModule, sanitize: bool) -> str:
    launchers = [
        f'extern "C" int cuconv_launch_{i}(const unsigned* grid, const unsigned* block, '
        f"unsigned long long shared_bytes, void** args, char* error, int error_bytes) {{\n"
        f"  return cuconv_emu::launch(&{name}, grid, block, shared_bytes, args, error, error_bytes);\n}}\n"
        f'extern "C" int cuconv_arity_{i}() {{ return cuconv_emu::kernel_arity(&{name}); }}\n'
        for i, name in enumerate(module.name_expressions)
    ]
    source = module.source()
    if sanitize:
        source = _opaque_shared(source)
        launchers += [
            f'extern "C" int cuconv_launch_checked_{i}(const unsigned* grid, const unsigned* block, '
            f"unsigned long long shared_bytes, void** args, cuconv_emu::san::Launch* out, char* error, "
            f"int error_bytes) {{\n  return cuconv_emu::launch_checked(&{name}, grid, block, shared_bytes, args, "
            f"out, error, error_bytes);\n}}\n"
            for i, name in enumerate(module.name_expressions)
        ]
    return source + "\n" + "".join(launchers)


_SHARED_DECLARATION = re.compile(r"^(\s*)((?:__align__\(\s*\d+\s*\)\s*)?)__shared__\s+([^;]+);")
_DECLARATOR = re.compile(r"(.*?)\s*(\w+)\s*((?:\[[^\]]*\]\s*)*)$")


def _opaque_shared(source: str) -> str:
    """The source with each `__shared__ T name[dims], ...;` declaration (one line, function
    scope) rewritten to `static thread_local T storage[dims]; T (&name)[dims] = *opaque(&storage);`
    on the same line: g++ skips instrumenting accesses it can prove inside a thread_local
    (a scalar, a constant index), and cannot through the reference (sanitizer.h)."""
    out = []
    for line in source.split("\n"):
        m = _SHARED_DECLARATION.match(line)
        if m and "extern" not in line:
            indent, align, declarators = m.groups()
            first, *rest = _split_top_level(declarators, angles=True)
            ctype, name, dims = _DECLARATOR.match(first.strip()).groups()
            parts = []
            for name, dims in [(name, dims)] + [_DECLARATOR.match(d.strip()).groups()[1:] for d in rest]:
                storage = f"cuconv_shared_{name}"
                parts.append(f"{align}static thread_local {ctype} {storage}{dims}; "
                             f"{ctype} (&{name}){dims} = *::cuconv_emu::san::opaque(&{storage});")
            line = indent + " ".join(parts) + line[m.end():]
        out.append(line)
    return "\n".join(out)


def _build(module: KernelModule, sanitize: bool = False) -> Path:
    cxx = compiler()
    source = _wrapper_source(module, sanitize)
    flags = _FLAGS + _SANITIZE_FLAGS if sanitize else _FLAGS
    key = hashlib.sha256("\0".join(
        [source, EMULATION_HEADER.read_text(), SANITIZER_HEADER.read_text(), " ".join(flags),
         _compiler_version(cxx)]).encode()).hexdigest()[:24]
    variant = "-sanitize" if sanitize else ""
    target = cache_dir() / f"{Path(module.filename).stem}{variant}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cpp = Path(tmp) / (Path(module.filename).stem + ".cpp")
        cpp.write_text(source)
        built = Path(tmp) / "module.so"
        cmd = [cxx, *flags, "-include", str(EMULATION_HEADER), str(cpp), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cuconv interpret backend: compiling {module.filename} failed:\n{result.stderr}")
        os.replace(built, target)  # atomic: concurrent processes never see a partial file
    return target


@functools.cache
def _library(module: KernelModule, sanitize: bool = False):
    """(lib, launchers, arities); with `sanitize`, the instrumented build, whose launchers
    are the checked ones (taking a _Launch* before the error buffer)."""
    path = _build(module, sanitize)
    lib = ctypes.CDLL(str(path))
    lib.path = str(path)
    launchers, arities = {}, {}
    for i, name in enumerate(module.name_expressions):
        fn = getattr(lib, f"cuconv_launch_checked_{i}" if sanitize else f"cuconv_launch_{i}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong,
                       ctypes.POINTER(ctypes.c_void_p), *([ctypes.POINTER(_Launch)] if sanitize else []),
                       ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
        launchers[name] = fn
        arity = getattr(lib, f"cuconv_arity_{i}")
        arity.argtypes, arity.restype = [], ctypes.c_int
        arities[name] = arity()
    if sanitize:
        lib.cuconv_trace_size.restype = ctypes.c_ulonglong
    return lib, launchers, arities


def kernel_arity(module: KernelModule, kernel: str, dtype: str) -> int:
    """The parameter count of the compiled instantiation (params struct included)."""
    return _library(module)[2][module.name_expression(kernel, dtype)]


def launch(module: KernelModule, kernel: str, dtype: str, grid, block, shared_bytes: int,
           params: np.ndarray, arrays: list) -> None:
    """Runs one kernel: `arrays` are host NumPy arrays (or None for a null pointer)."""
    params = np.ascontiguousarray(params)
    launch_addresses(module, module.name_expression(kernel, dtype), grid, block, shared_bytes, params.ctypes.data,
                     [None if a is None else a.ctypes.data for a in arrays],
                     [0 if a is None else _byte_extent(a) for a in arrays])


def _byte_extent(a: np.ndarray) -> int:
    """The bytes from a's data pointer to the end of its last element (a view's strides
    may reach further than nbytes; negative strides are not passed to kernels)."""
    if a.size == 0:
        return 0
    return int(sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize)


def launch_addresses(module: KernelModule, name_expression: str, grid, block, shared_bytes: int,
                     params_address: int, addresses: list, extents: list | None = None) -> None:
    """Runs one instantiation on host addresses, as cuLaunchKernel takes them: the params
    struct's and each array argument's (None or 0 for a null pointer). `extents` are the
    arrays' byte sizes, for the sanitizers; without them an argument's extent is unbounded."""
    kernel = name_expression.partition("<")[0]
    if shared_bytes > MAX_SHARED_BYTES:
        raise RuntimeError(f"{kernel}: {shared_bytes} bytes of shared memory exceed {MAX_SHARED_BYTES}")
    checks = sanitize_checks()
    recorder = _recorders[-1] if _recorders else None
    checked = bool(checks) or recorder is not None
    lib, launchers, arities = _library(module, checked)
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
    if not checked:
        if fn(grid3, block3, shared_bytes, args, error, len(error)) != 0:
            raise RuntimeError(f"cuconv interpret backend: {name_expression}: {error.value.decode()}")
        return
    starts = [a or 0 for a in addresses]
    extents = [1 << 62] * len(addresses) if extents is None else [int(n) for n in extents]
    blocks = None
    if recorder is not None and recorder.sample_blocks is not None:
        blocks = sampled_block_indices(int(np.prod(grid3[:])), recorder.sample_blocks)
    out = _Launch(checks=checks | (_RECORD if recorder is not None else 0), arrays=len(addresses))
    out.array_start = (ctypes.c_uint64 * max(1, len(starts)))(*starts)
    out.array_bytes = (ctypes.c_uint64 * max(1, len(extents)))(*extents)
    if blocks is not None:
        out.blocks = (ctypes.c_uint64 * len(blocks))(*blocks)
        out.block_count = len(blocks)
    failed = fn(grid3, block3, shared_bytes, args, ctypes.byref(out), error, len(error))
    names = _array_names(module, kernel)
    if recorder is not None:
        recorder.traces.append(_take_trace(lib, out, name_expression, tuple(grid3), tuple(block3), shared_bytes,
                                           names, starts, extents, blocks))
    if failed:
        raise RuntimeError(f"cuconv interpret backend: {name_expression}: {error.value.decode()}")
    if out.findings:
        raise SanitizerError(_describe(lib.path, name_expression, names, out))


# --- sanitizers and access recording (the instrumented build) ---

def sanitize_checks() -> int:
    """The CHECKS bits CUCONV_SANITIZE asks for: a comma-separated subset of memcheck,
    racecheck, initcheck, or `all`; unset or empty for none."""
    value = os.environ.get("CUCONV_SANITIZE", "").strip().lower()
    if not value or value == "0":
        return 0
    bits = 0
    for name in filter(None, (v.strip() for v in value.split(","))):
        if name == "all":
            bits |= sum(CHECKS.values())
        elif name in CHECKS:
            bits |= CHECKS[name]
        else:
            raise ValueError(f"CUCONV_SANITIZE: unknown check {name!r} (expected {', '.join(CHECKS)} or all)")
    return bits


class _Finding(ctypes.Structure):  # sanitizer.h: san::Finding
    _fields_ = [("kind", ctypes.c_uint32), ("write", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("other_write", ctypes.c_uint32), ("block", ctypes.c_uint32 * 3), ("thread", ctypes.c_uint32 * 3),
                ("other_thread", ctypes.c_uint32 * 3), ("region", ctypes.c_int32), ("address", ctypes.c_uint64),
                ("region_start", ctypes.c_uint64), ("region_bytes", ctypes.c_uint64), ("site", ctypes.c_uint64),
                ("other_site", ctypes.c_uint64), ("block_order", ctypes.c_uint64)]


class _Launch(ctypes.Structure):  # sanitizer.h: san::Launch
    _fields_ = [("checks", ctypes.c_uint32), ("arrays", ctypes.c_uint32),
                ("array_start", ctypes.POINTER(ctypes.c_uint64)), ("array_bytes", ctypes.POINTER(ctypes.c_uint64)),
                ("blocks", ctypes.POINTER(ctypes.c_uint64)), ("block_count", ctypes.c_uint64),
                ("findings", ctypes.c_uint64), ("first", _Finding), ("trace", ctypes.c_void_p)]


_KINDS = {1: "memcheck", 2: "memcheck", 3: "racecheck", 4: "initcheck"}
_DYNAMIC_SHARED, _STATIC_SHARED, _STACK, _READ_ONLY = -2, -3, -4, -5


def _array_names(module: KernelModule, kernel: str) -> list[str]:
    """The array parameters' names, from the kernel's signature in the .cu text."""
    try:
        declarations = module.kernel_parameters(kernel)[1:]
    except (KeyError, ValueError):
        return []
    return [(re.findall(r"\w+", d) or ["?"])[-1] for d in declarations]


@functools.cache
def _source_line(library: str, site: int) -> str:
    """`file.cu:line` of the instruction before `site` (a return address, i.e. just past
    the call the instrumentation made), from the library's line table (#line directives
    name the .cu files)."""
    if not site:
        return "unknown line"
    try:
        out = subprocess.run(["addr2line", "-i", "-e", library, hex(site - 1)], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{Path(library).name}+{site:#x}"
    # -i lists the inlined frames innermost first: an access inside an emulated intrinsic
    # (e.g. __half2float reading its operand) belongs to the kernel line that called it.
    frames = [f.split(" (discriminator")[0] for f in out.splitlines()] or [""]
    kernel_frames = [f for f in frames if Path(f.rpartition(":")[0]).name not in _EMULATION_FILES]
    file, _, line = (kernel_frames or frames)[0].rpartition(":")
    if not file or file == "??" or line in ("0", "?"):
        return f"{Path(library).name}+{site:#x}"
    return f"{Path(file).name}:{line}"


def _region_name(region: int, names: list[str], start: int, nbytes: int) -> str:
    if region >= 0:
        name = names[region] if region < len(names) else "?"
        # Kernel parameter numbering: the params struct is argument 0.
        return f"argument {region + 1}, `{name}`, {nbytes} bytes"
    return {_DYNAMIC_SHARED: f"dynamic shared memory, {nbytes} bytes",
            _STATIC_SHARED: "static shared memory",
            _STACK: "the thread's stack",
            _READ_ONLY: "read-only data"}.get(region, "no known buffer")


def _position(f: _Finding, names: list[str]) -> str:
    """The address relative to the region it lies in, or to the nearest one."""
    where = _region_name(f.region, names, f.region_start, f.region_bytes)
    if f.region == -1:
        return f"address {f.address:#x}, in no known buffer"
    end = f.region_start + f.region_bytes
    if f.address >= end:
        return f"{f.address - end} bytes past the end of {where}"
    if f.address < f.region_start:
        return f"{f.region_start - f.address} bytes before the start of {where}"
    offset = f.address - f.region_start
    if f.address + f.size > end:
        return f"at byte {offset} of {where}, running {f.address + f.size - end} bytes past its end"
    return f"at byte {offset} of {where}"


def _describe(library: str, kernel: str, names: list[str], out: _Launch) -> str:
    f = out.first
    block, thread = tuple(f.block), tuple(f.thread)
    access = f"{'write' if f.write else 'read'} of {f.size} bytes"
    line = _source_line(library, f.site)
    if f.kind == 1:
        what = f"out-of-bounds {access} {_position(f, names)} (not performed; the thread ended there)"
    elif f.kind == 2:
        what = f"misaligned {access} {_position(f, names)}"
    elif f.kind == 4:
        what = f"{access} of shared memory no thread of the block has written, {_position(f, names)}"
    else:
        earlier = "write" if f.other_write else "read"
        hazard = {(True, False): "read-after-write", (False, True): "write-after-read",
                  (True, True): "write-after-write"}[(bool(f.other_write), bool(f.write))]
        what = (f"{hazard} hazard on shared memory {_position(f, names)}: {access} at {line} by thread {thread} "
                f"and an earlier {earlier} at {_source_line(library, f.other_site)} by thread {tuple(f.other_thread)}"
                f" with no barrier between them")
    rest = out.findings - 1
    more = f" (and {rest} more finding{'s' if rest != 1 else ''} in this launch)" if rest else ""
    return f"{_KINDS[f.kind]}: {kernel}: block {block}, thread {thread}: {what}; at {line}{more}"


# --- the raw access trace (a profiler's input) ---

ACCESS_DTYPE = np.dtype([("site", "u8"), ("block", "u4"), ("warp", "u4"), ("lane", "u1"), ("nth", "u4"),
                         ("address", "u8"), ("size", "u1"), ("write", "u1"), ("space", "u1")])
SPACES = ("global", "shared", "local")  # ACCESS_DTYPE's `space`: 0, 1, 2 (local: the thread's stack)


@dataclass
class LaunchTrace:
    """Every memory access of kernel code in one launch (of its sampled blocks), in
    execution order within each block, blocks in `sampled_blocks` order."""

    kernel: str                                 # name expression, e.g. "conv2d_fwd<float>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    arguments: list[tuple[str, int, int]]       # (parameter name, address, nbytes) per array argument
    sampled_blocks: list[int]                   # linear indices of the blocks that ran
    accesses: np.ndarray                        # ACCESS_DTYPE
    barriers: np.ndarray                        # per sampled block: __syncthreads it executed
    library: str = field(default="", repr=False)

    def site_line(self, site: int) -> str:
        """`file.cu:line` of an access site, e.g. "conv2d.cu:123"."""
        return _source_line(self.library, int(site))


@dataclass
class _Recorder:
    sample_blocks: int | None
    traces: list = field(default_factory=list)


_recorders: list[_Recorder] = []
_recorders_lock = threading.Lock()


def sampled_block_indices(total: int, sample: int) -> list[int]:
    """`sample` linear block indices of `total`: the first, the last and the rest evenly
    spaced between them (all of them if sample >= total)."""
    if sample >= total:
        return list(range(total))
    if sample <= 1:
        return [0]
    return sorted({round(i * (total - 1) / (sample - 1)) for i in range(sample)})


@contextlib.contextmanager
def record_accesses(sample_blocks: int | None = None):
    """Records every launch inside the block: yields a list that receives one LaunchTrace
    per launch. With `sample_blocks`=N a launch runs ONLY N of its blocks (the first, the
    last, the rest evenly spaced), so outputs are incomplete: for profiling, not results."""
    if sample_blocks is not None and sample_blocks < 1:
        raise ValueError(f"sample_blocks must be at least 1, got {sample_blocks}")
    recorder = _Recorder(sample_blocks)
    with _recorders_lock:
        _recorders.append(recorder)
    try:
        yield recorder.traces
    finally:
        with _recorders_lock:
            _recorders.remove(recorder)


def _take_trace(lib, out: _Launch, kernel, grid, block, shared_bytes, names, starts, extents, blocks):
    total = int(np.prod(grid))
    count = lib.cuconv_trace_size(ctypes.byref(out))
    accesses = np.empty(count, ACCESS_DTYPE)
    sampled = list(range(total)) if blocks is None else list(blocks)
    barriers = np.zeros(len(sampled), np.uint32)
    lib.cuconv_trace_copy(ctypes.byref(out), ctypes.c_void_p(accesses.ctypes.data),
                          ctypes.c_void_p(barriers.ctypes.data))
    lib.cuconv_trace_free(ctypes.byref(out))
    arguments = [(names[i] if i < len(names) else f"argument {i + 1}", a, n)
                 for i, (a, n) in enumerate(zip(starts, extents)) if a]
    return LaunchTrace(kernel, grid, block, shared_bytes, arguments, sampled, accesses, barriers, lib.path)
