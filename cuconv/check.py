"""`cuconv check`: compile every kernel instantiation with NVRTC for each target
architecture, without a GPU, and report each kernel's registers, spills and static
shared memory. CI runs it, so CUDA-only code paths are at least compiled."""

from __future__ import annotations

from dataclasses import dataclass

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


def compile_all(archs=ARCHS, modules=None) -> list[CheckRow]:
    """Every instantiation of every registered kernel module (or of the named .cu files),
    for each arch; raises NvrtcError (with the log) on the first module that fails."""
    rows = []
    for module in selected_modules(modules):
        for arch in archs:
            result = compile_to_cubin(module.source(), module.name_expressions, arch=arch,
                                      program_name=module.filename)
            rows += [CheckRow(module.filename, name, arch,
                              result.resources.get(name, KernelResources(None, None, None, None)))
                     for name in module.name_expressions]
    return rows


def _fmt(v) -> str:
    return "?" if v is None else str(v)


def main(archs=ARCHS, modules=None) -> int:
    try:
        rows = compile_all(archs, modules)
    except ValueError as e:
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
    return 0
