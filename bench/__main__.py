"""Self-check every op against its float64 reference, then (on a CUDA GPU only) time it
against its baseline. Exit status 1 when any self-check row fails."""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import sys
from pathlib import Path

import numpy as np

import cuconv

from . import SUITES, harness, suite_ops, suites_named

NO_GPU = "No CUDA GPU found: ran the interpret backend self-check at small sizes; no timings measured."
def results_dir() -> Path:
    """bench/results in a checkout (committed with the code); ./cuconv-bench-results when
    running from an installed wheel (never inside site-packages)."""
    here = Path(__file__).resolve().parent
    return here / "results" if (here.parent / "setup.cfg").is_file() else Path.cwd() / "cuconv-bench-results"


RESULTS_DIR = results_dir()


def _op_listing() -> str:
    return "; ".join(f"{', '.join(suite_ops(s))} (suite {s.NAME})" for s in SUITES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cuconv bench", description=__doc__,
                                epilog=f"ops for --op, with the suite that runs each: {_op_listing()}")
    p.add_argument("--quick", action="store_true", help="a few shapes and fewer repeats")
    p.add_argument("--op", default=None,
                   help="comma-separated public op names (deform_conv2d, ...) or suite names (default: all; "
                        "the list is below)")
    p.add_argument("--verbose", action="store_true", help="print every self-check row, not one line per op and dtype")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (default: all four in the self-check; "
                        f"{','.join(harness.GPU_DEFAULT_DTYPES)} in the timings)")
    p.add_argument("--json", default=None, help="results file (default bench/results/<device>.json; GPU runs only)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 30, 10 with --quick)")
    p.add_argument("--plot", action="store_true", help="also write <results>-ratios.png and <results>-roofline.png "
                                                       "(GPU runs only; needs matplotlib)")
    p.add_argument("--seed", type=int, default=None, help="self-check input seed (default: fresh, printed)")
    args = p.parse_args(argv)
    if args.op is None:
        args.suites = list(SUITES)
    else:
        ops = [o.strip() for o in args.op.split(",") if o.strip()]
        unknown = [o for o in ops if not suites_named(o)]
        if unknown or not ops:
            p.error(f"--op: unknown {unknown}; choose from {_op_listing()}")
        args.suites = [s for s in SUITES if any(s in suites_named(o) for o in ops)]
    if args.dtype is not None:
        args.dtype = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
        bad = [d for d in args.dtype if d not in harness.ALL_DTYPES]
        if bad or not args.dtype:
            p.error(f"--dtype: unknown {bad}; choose from {list(harness.ALL_DTYPES)}")
    if args.repeats is None:
        args.repeats = 10 if args.quick else 30
    elif args.repeats < 1:
        p.error("--repeats must be positive")
    return args


def self_check(args, backends, torch_module) -> list[harness.CheckRow]:
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"== self-check vs the float64 reference (backends: {', '.join(backends)}; seed {seed}) ==")
    rng = np.random.default_rng(seed)
    rows = []
    for backend in backends:
        with harness.cuconv_env(backend, poison=True):
            for suite in args.suites:
                rows += suite.self_check(args.dtype or harness.ALL_DTYPES, [backend], rng, torch_module)
    if args.verbose:
        harness.print_check_table(rows)
    else:
        harness.print_check_summary(rows)
    print("  tolerance on max|err|/max|ref|: 'fixed' float64 1e-9, float32 1e-4; '2x torch' twice torch CPU's error "
          "in that dtype; 'floor' where that is below fp16 2^-10, bf16 2^-7; 'bound' fp16 2e-2, bf16 1e-1 where "
          "torch CPU lacks the op in that dtype; 'exact' 0 for ops that round nothing (pixel shuffle)")
    return rows


def _summary(rows) -> str:
    failed = sum(not r.ok for r in rows)
    return f"self-check: {len(rows) - failed} passed, {failed} failed"


def benchmark(args, check_rows, torch_module) -> None:
    if torch_module is None:
        print("torch with CUDA not found: timing cuconv alone (no torch/cuDNN baselines; no bfloat16 on CuPy).")
    else:
        # Strongest fair baseline: cuDNN autotuned, and true fp32 (no TF32) as cuconv computes.
        torch_module.backends.cudnn.benchmark = True
        torch_module.backends.cudnn.allow_tf32 = False
    events = harness.Events(torch_module)
    l2 = harness.l2_cache_bytes(torch_module)
    dtypes = args.dtype or harness.GPU_DEFAULT_DTYPES
    failing = {(r.op, r.dtype) for r in check_rows if not r.ok}  # a check row names an op or a suite
    failed = {(s.NAME, dtype) for s in args.suites for name in (s.NAME, *suite_ops(s)) for dtype in harness.ALL_DTYPES
              if (name, dtype) in failing}
    warmup = 3
    with harness.cuconv_env("cuda", poison=False):
        print("\n== ceilings ==")
        ceilings = harness.measure_ceilings(events, args.quick)
        print(f"device-to-device copy: {ceilings.copy_gbs:.0f} GB/s (read + write); "
              f"{ceilings.gemm_label}: {ceilings.gemm_tflops:.1f} TFLOP/s")
        print(f"\n== timings (median of {args.repeats} runs after {warmup} warm-up; input sets rotated past "
              f"L2 = {l2 / 2**20:.0f} MiB) ==")
        cases = [case for suite in args.suites for case in suite.bench_cases(dtypes, args.quick, torch_module)]
        rows = []
        for i, case in enumerate(cases, 1):
            progress = f"[{i:>{len(str(len(cases)))}}/{len(cases)}]"
            if (case.op, case.dtype) in failed:
                print(f"{progress} skipped {case.op} {case.dtype} {case.label} {case.pass_}: failed its self-check")
                continue
            row = harness.run_case(case, events, l2, warmup, args.repeats, ceilings)
            rows.append(row)
            extra = "".join(f"  {n} {b['ms']:.3f} ms" for n, b in row["baselines"].items())
            print(f"{progress} {row['op']} {row['shape']} {row['dtype']} {row['pass']}: "
                  f"cuconv {row['cuconv_ms']:.3f} ms{extra}", flush=True)
    print()
    print(harness.markdown_table(rows))
    device = (torch_module.cuda.get_device_name(0) if torch_module is not None else _cupy_device_name())
    import cupy

    result = dict(
        device=device,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=dict(cuconv=cuconv.__version__, cupy=cupy.__version__,
                      torch=torch_module.__version__ if torch_module is not None else None),
        settings=dict(quick=args.quick, repeats=args.repeats, warmup=warmup, l2_bytes=l2,
                      cudnn_benchmark=torch_module is not None, cudnn_allow_tf32=False),
        ceilings=dict(copy_gbs=ceilings.copy_gbs, gemm_tflops=ceilings.gemm_tflops, gemm=ceilings.gemm_label),
        self_check=dict(passed=sum(r.ok for r in check_rows), failed=sum(not r.ok for r in check_rows)),
        rows=rows,
    )
    path = Path(args.json) if args.json else RESULTS_DIR / f"{harness.device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults written to {path}")
    if args.plot:
        from .plots import write_plots

        for png in write_plots(result, path):
            print(f"plot written to {png}")


def _cupy_device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = harness.cuda_gpu_usable()
    torch_module = harness.torch_cuda() if gpu else None
    check_rows = self_check(args, ["interpret", "cuda"] if gpu else ["interpret"], torch_module)
    if gpu:
        benchmark(args, check_rows, torch_module)
    else:
        print(NO_GPU)
        if args.json or args.plot:
            print(f"{' and '.join(f for f, on in (('--json', args.json), ('--plot', args.plot)) if on)}: "
                  f"nothing written, there are no timings without a GPU.")
    print(_summary(check_rows))
    return 1 if any(not r.ok for r in check_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
