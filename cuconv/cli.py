"""The `cuconv` command: `cuconv bench` (self-check every op, then time it on a GPU),
`cuconv check` (compile every kernel with NVRTC, no GPU needed) and `cuconv info`
(backends and versions)."""

from __future__ import annotations

import argparse
import sys


def _info() -> int:
    import cuconv
    from . import _interpret

    print(f"cuconv {cuconv.__version__}")
    try:
        print(f"interpret backend: C++ compiler {_interpret.compiler()}")
    except RuntimeError as e:
        print(f"interpret backend: unavailable ({e})")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        print(f"cuda backend: CuPy {cupy.__version__}, {count} device(s)")
    except Exception as e:  # no CuPy, no driver or no device
        print(f"cuda backend: unavailable ({type(e).__name__}: {e})")
    import os

    from . import _autotune

    state = "on" if os.environ.get("CUCONV_AUTOTUNE", "").strip() == "1" else "off (CUCONV_AUTOTUNE=1 turns it on)"
    print(f"autotuning: {state}; cache {_autotune.cache_path()}")
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
    sub.add_parser("info", help="which backends are usable here")
    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import ARCHS, main as check_main

        return check_main(tuple(args.arch) if args.arch else ARCHS)
    return _info()


if __name__ == "__main__":
    sys.exit(main())
