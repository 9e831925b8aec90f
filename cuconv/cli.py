"""The `cuconv` command: `cuconv bench` (self-check every op, then time it on a GPU),
`cuconv check` (compile every kernel with NVRTC, no GPU needed) and `cuconv info`
(what works here, versions, caches)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: say so rather than fail
        return "not installed"


def _interpret_status() -> str:
    from . import _interpret

    try:
        cxx = _interpret.compiler()
        first = _interpret._compiler_version(cxx).splitlines()[0]
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        return f"unavailable ({e})"
    return f"works ({first})"


def _driver_cuda_version():
    """The CUDA version the NVIDIA driver supports, (major, minor), or None without a
    driver (libcuda not loadable)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def _gpu_status() -> list[str]:
    """What the cuda backend can do here, worded by the actual cause."""
    try:
        import cupy
    except ImportError:
        return ["cuda backend: CuPy not installed (pip install '.[cuda12]' or '.[cuda13]'); "
                "the interpret backend runs every op"]
    driver = _driver_cuda_version()
    if driver is None:
        return [f"cuda backend: no NVIDIA driver found (CuPy {cupy.__version__} is installed); "
                "the interpret backend runs every op"]
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    runtime = (runtime // 1000, runtime % 1000 // 10)
    if driver < runtime:
        return [f"cuda backend: driver too old for CUDA {runtime[0]}.{runtime[1]} (CuPy {cupy.__version__}); "
                f"the driver supports CUDA {driver[0]}.{driver[1]}"]
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # a driver but no usable device
        return [f"cuda backend: no usable GPU ({type(e).__name__}: {e})"]
    lines = [f"cuda backend: CuPy {cupy.__version__}, CUDA runtime {runtime[0]}.{runtime[1]}, driver supports CUDA "
             f"{driver[0]}.{driver[1]}, {count} GPU(s)"]
    for i in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        lines.append(f"  GPU {i}: {name} (sm_{props['major']}{props['minor']}, "
                     f"{props['totalGlobalMem'] / 2**30:.0f} GiB)")
    return lines


def _probe_status() -> list[str]:
    """The tensor-core verdict for each visible GPU: the fragment probes run here, a few
    microseconds per GPU once compiled. Not on interpret, which runs them at its first
    float16/bfloat16 algorithm='auto' call."""
    from . import _probes

    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device: _gpu_status says which
        count = 0
    if count == 0:
        return ["tensor-core probes: not run (no GPU here); the interpret backend runs them on its host "
                "fallbacks at its first float16/bfloat16 algorithm='auto' call"]
    try:
        mode = _probes.mode()
    except ValueError as e:
        return [f"tensor-core probes: {e}"]
    forced = "" if mode == "run" else f" (forced by CUCONV_TENSOR_CORE_PROBES={mode})"
    lines = []
    for i in range(count):
        with warnings.catch_warnings():  # the failure is printed here, not warned about
            warnings.simplefilter("ignore", RuntimeWarning)
            report = _probes.report("cuda", i)
        if report.passed:
            lines.append(f"  GPU {i} tensor-core probes: passed{forced}; algorithm='auto' may use the tensor "
                         f"cores for float16/bfloat16")
        else:
            lines.append(f"  GPU {i} tensor-core probes: FAILED{forced} ({report.summary()}); algorithm='auto' "
                         f"stays on the exact kernels")
    return lines


def _folder_summary(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return f"{path} ({len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB)"


def _info() -> int:
    import cuconv

    from . import _autotune, _interpret

    print(f"cuconv {cuconv.__version__}")
    print(f"interpret backend: {_interpret_status()}")
    for line in _gpu_status() + _probe_status():
        print(line)
    try:
        from ._nvrtc import nvrtc_version

        nvrtc = "{}.{}".format(*nvrtc_version())
    except Exception as e:  # no NVRTC wheel: `cuconv check` needs pip install '.[check]'
        nvrtc = f"not found ({type(e).__name__})"
    try:
        gxx = _interpret._compiler_version(_interpret.compiler()).splitlines()[0]
    except Exception:
        gxx = "not found"
    print(f"versions: numpy {_version('numpy')}, CuPy {_version('cupy')}, NVRTC {nvrtc}, torch {_version('torch')}, "
          f"jax {_version('jax')}, {gxx}")
    print(f"kernel cache (interpret): {_folder_summary(_interpret.cache_dir())}")
    cupy_cache = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    print(f"kernel cache (CuPy): {_folder_summary(cupy_cache)}")
    state = "on" if os.environ.get("CUCONV_AUTOTUNE", "").strip() == "1" else "off (CUCONV_AUTOTUNE=1 turns it on)"
    path = _autotune.cache_path()
    try:
        entries = f"{len(json.loads(path.read_text()))} entries" if path.is_file() else "empty"
    except (OSError, ValueError) as e:
        entries = f"unreadable: {e}"
    print(f"autotuning: {state}; cache {path} ({entries})")
    return 0


def _bench(argv) -> int:
    try:  # installed: bench/ ships as cuconv.bench; in a checkout it is the top-level package
        from .bench.__main__ import main as bench_main
    except ImportError:
        from bench.__main__ import main as bench_main
    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every further argument is the benchmark's own (see cuconv bench --help)
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="cuconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="self-check every op, then time it against its baseline on a GPU "
                                 "(--quick, --op, --dtype, --json, --plot; see cuconv bench --help)")
    check = sub.add_parser("check", help="compile every kernel instantiation with NVRTC (no GPU needed)")
    check.add_argument("--arch", action="append", help="target, e.g. sm_90 (repeatable; default sm_80 and sm_90)")
    check.add_argument("--module", action="append", help="a kernels_cu file, e.g. conv2d.cu (repeatable; default all)")
    check.add_argument("--via", choices=("nvrtc", "cupy"), default="nvrtc",
                       help="nvrtc: cuconv's own NVRTC binding (default); cupy: CuPy 14.2's own compile path "
                            "(its options, header lookup, name_expressions), with its toolkit; fails on a spill too")
    check.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="compiles at a time with --via cupy (default: the number of cores)")
    sub.add_parser("info", help="what works here (interpret and cuda backends, and why not; each GPU's "
                                "tensor-core probe verdict), versions of cuconv, CuPy, NVRTC, torch, jax, "
                                "numpy and g++, kernel caches, autotuning")
    prof = sub.add_parser("profile", help="an EMULATED memory-access profile (coalescing, bank conflicts, "
                                          "divergence, DRAM traffic), H100 occupancy and a roofline model of an op "
                                          "on the interpret backend (no GPU needed; see docs/profile.md)")
    prof.add_argument("op", help="a public op, e.g. conv2d")
    prof.add_argument("--example", type=int, default=0, help="which of the op's registry examples (default 0)")
    prof.add_argument("--bench-row", default=None, help="a bench suite row by its label, e.g. '3x3 64->64 56' "
                                                       "(its shapes and FLOPs); overrides --example")
    prof.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32", "float64"))
    prof.add_argument("--algorithm", default=None, help="force an algorithm (conv2d: direct, implicit_gemm, ...)")
    prof.add_argument("--blocks", type=int, default=8,
                      help="blocks run per launch: the first, the last and evenly spaced ones (0: all; default 8)")
    prof.add_argument("--backward", action="store_true", help="the forward and every gradient (bench: fwd+bwd)")
    prof.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "profile":
        from ._profile import main as profile_main

        return profile_main(args)
    if args.command == "check":
        from .check import ARCHS, main as check_main

        return check_main(tuple(args.arch) if args.arch else ARCHS, args.module, args.via, args.jobs)
    return _info()


if __name__ == "__main__":
    sys.exit(main())
