#!/usr/bin/env bash
# The GPU bring-up as one device call of at most 8 minutes (the device gives a task 15
# minutes in all, machine start included, and one command 10). Five stages run in order,
# each in its own process group under its own time box; a stage that fails or runs out
# of time is recorded and the next one starts. The driver is tools/gpu_session.py.
#
#   stage     box   what
#   compile    90 s  every kernel module once through the cuda backend's RawModule, a
#                    process per module, all at once; fills ~/.cupy/kernel_cache, so the
#                    later stages load kernels instead of compiling them
#   probes     30 s  cuconv._probes.run_probes(0, "cuda"): the tensor-core fragment layouts
#   tests     140 s  the cuda-parametrized tests (-k "cuda and not interpret"), 8 xdist
#                    workers, without the slow NVRTC files below
#   sanitize   90 s  compute-sanitizer memcheck over the fast paths' cuda tests, with
#                    CuPy's, torch's and JAX's memory pools off
#   bench      80 s  python3 -m bench --quick --json $OUT/bench.json
#   total     430 s  the driver's budget is 450 s (a box is cut to what is left of it,
#                    and a stage past its box gets 8 s to write its reports); the guard
#                    below stops everything by 465 s + 10 s = 7 min 55 s
#
# Run from the repository root on the device machine (python3 there has CuPy, torch,
# JAX, pytest-xdist and compute-sanitizer); with the device tool:
#   run(command="bash tools/gpu_session.sh", timeout_s=500)
# Everything goes to $OUT (default ./gpu-out), at most 8 files: summary.json,
# session.log, tests.xml, sanitize.xml, memcheck.log, bench.json (extras.tar.gz if
# anything else turned up). The end of stdout is a compact summary.
#
# Resume: $OUT is empty at every call, so the stages to run are named in the call:
#   STAGES=compile,tests bash tools/gpu_session.sh     only these (or --stages compile,tests)
#   bash tools/gpu_session.sh --from sanitize         this stage and the ones after it
#   bash tools/gpu_session.sh --box tests=300         another box for a stage
# summary.json's "not_completed" lists the stages that ran out of time or were not
# reached, and "resume" is the call that runs them (after compile: a fresh machine's
# kernel cache is empty). CUCONV_GPU_SESSION_DRY_RUN=1 prints each stage's command
# instead of running it.
set -u
OUT="$(realpath -m "${OUT:-gpu-out}")"
cd "$(dirname "$0")/.." || exit 2
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

# The fast paths' cuda tests, the tensor-core ones first (the likeliest to overrun).
SANITIZE_TESTS="tests/test_depthwise_tc.py tests/test_conv2d_igemm.py tests/test_depthwise.py"
# Their NVRTC compiles take 325 s, need no GPU, and CI runs them.
SKIP_TESTS="tests/test_nvrtc.py tests/test_check.py"

# The driver keeps its own 450 s budget; this guard catches a driver that hangs.
timeout --kill-after=10 465 python3 tools/gpu_session.py --out "$OUT" \
  --sanitize-tests "$SANITIZE_TESTS" --skip-tests "$SKIP_TESTS" "$@"
