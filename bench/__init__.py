"""cuconv benchmarks: `python -m bench [--quick] [--op conv2d] [--dtype float32,...]
[--json PATH] [--repeats N]` from the repository root.

First a self-check of every op against the float64 reference (always: the interpret
backend, plus the cuda backend when a GPU is usable), then, on a CUDA GPU only, timings
against the baselines with JSON results under bench/results/.

One module per op family. A suite is any public module of this package that defines
NAME, self_check and bench_cases (bench/harness.py describes them), and OPS, the public
ops it covers (default: NAME alone); importing the package imports every public module
and SUITES lists the suites in module-name order. A new suite is a new module here,
nothing else.
"""

import importlib
import pkgutil

_SUITE_API = ("NAME", "self_check", "bench_cases")

_MODULES = [importlib.import_module(f"{__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
            if not info.name.startswith("_")]  # private modules and __main__ (the entry point)
SUITES = tuple(m for m in _MODULES if all(hasattr(m, attr) for attr in _SUITE_API))


def suite_ops(suite) -> tuple[str, ...]:
    return tuple(getattr(suite, "OPS", (suite.NAME,)))


def suites_named(name: str) -> list:
    """The suites `name` selects: a public op's name (conv2d, deform_conv2d, ...) or a
    suite's own name (deform_conv, dynamic_conv, ...)."""
    return [s for s in SUITES if name == s.NAME or name in suite_ops(s)]
