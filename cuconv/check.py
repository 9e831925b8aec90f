"""`cuconv check`: compile every kernel instantiation with NVRTC for each target
architecture, without a GPU, and report each kernel's registers, spills and static
shared memory. CI runs it, so CUDA-only code paths are at least compiled.

`--via nvrtc` (the default) uses cuconv's own NVRTC binding (the CUDA 12 wheel);
`--via cupy` goes through CuPy's own compile path (its options, header lookup and
name_expressions lowering, see _cupy_compile), with whichever CUDA toolkit that CuPy
uses, and fails on a spill as well as on a compile error."""

from __future__ import annotations

from dataclasses import dataclass

from . import _cupy_compile
from ._kernels import KernelModule, registered_modules
from ._nvrtc import KernelResources, NvrtcError, compile_to_cubin

ARCHS = ("sm_80", "sm_90")


def all_modules() -> list[KernelModule]:
    """Every KernelModule the ops define, by filename (importing cuconv.ops creates them)."""
    import cuconv.ops  # noqa: F401  (the op modules register their kernel modules)

    return registered_modules()


@dataclass(frozen=True)
class CheckRow:
    module: str
    kernel: str  # name expression, e.g. conv2d_fwd<float>
    arch: str
    resources: KernelResources


def selected_modules(names=None) -> list:
    """Every kernel module, or those whose file names are in `names` (ValueError naming
    an unknown one)."""
    modules = all_modules()
    if names is None:
        return modules
    unknown = sorted(set(names) - {m.filename for m in modules})
    if unknown:
        raise ValueError(f"cuconv check: no kernel module {unknown}; the modules are {[m.filename for m in modules]}")
    return [m for m in modules if m.filename in names]


def compile_all(archs=ARCHS, modules=None, via="nvrtc", workers=1) -> list[CheckRow]:
    """Every instantiation of every registered kernel module (or of the named .cu files),
    for each arch, compiled by cuconv's NVRTC binding or (via="cupy") through CuPy's
    compile path with `workers` compiles at a time; raises NvrtcError (with the log)
    on the first module that fails."""
    jobs = [(module, arch) for module in selected_modules(modules) for arch in archs]
    if via == "cupy":
        results = _cupy_compile.compile_all(
            [(m.source(), m.name_expressions, arch, m.filename) for m, arch in jobs], workers)
    else:
        results = [compile_to_cubin(m.source(), m.name_expressions, arch=arch, program_name=m.filename)
                   for m, arch in jobs]
    return [CheckRow(m.filename, name, arch, result.resources.get(name, KernelResources(None, None, None, None)))
            for (m, arch), result in zip(jobs, results) for name in m.name_expressions]


def _fmt(v) -> str:
    return "?" if v is None else str(v)


def main(archs=ARCHS, modules=None, via="nvrtc", workers=1) -> int:
    try:
        if via == "cupy":  # what compiles, before anything is compiled
            print(f"compiling through CuPy's compile path: {_cupy_compile.toolchain().describe()}", flush=True)
        rows = compile_all(archs, modules, via, workers)
    except (ValueError, _cupy_compile.CupyUnavailable) as e:
        print(e)
        return 2
    except NvrtcError as e:
        print(f"cuconv check: compilation failed\n{e}")
        return 1
    header = f"{'kernel':<44} {'arch':<6} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'smem B':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        res = r.resources
        print(f"{r.kernel:<44} {r.arch:<6} {_fmt(res.registers):>5} {_fmt(res.spill_stores):>9} "
              f"{_fmt(res.spill_loads):>9} {_fmt(res.shared_bytes):>7}")
    spilling = [r for r in rows if r.resources.spill_stores]
    print(f"\n{len(rows)} kernel instantiations compiled for {', '.join(archs)}; "
          f"{len(spilling)} spill registers.")
    if via == "cupy":
        # A spill, or a kernel ptxas said nothing about, fails this check.
        unreported = [r for r in rows if r.resources.spill_stores is None]
        for what, bad in (("spills", spilling), ("no ptxas report", unreported)):
            if bad:
                print(f"cuconv check --via cupy: {what}: " + ", ".join(f"{r.kernel} ({r.arch})" for r in bad))
        if spilling or unreported:
            return 1
    return 0
