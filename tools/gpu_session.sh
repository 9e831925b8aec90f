#!/usr/bin/env bash
# The first GPU session's checks, one stage per device call (each call may run at most
# 10 minutes; a session has 30 minutes of device time). Run from the repository root
# on the lent machine, whose image already has CuPy, torch, jax, compute-sanitizer and
# ncu (no pip install):
#
#   tools/gpu_session.sh probes     the tensor-core fragment-layout and TF32 probes first:
#                                   if the emulator's mma layout is wrong, everything
#                                   built on it is wrong, so stop there
#   tools/gpu_session.sh tests      the whole suite (the cuda parametrizations run)
#   tools/gpu_session.sh sanitize   compute-sanitizer memcheck and racecheck on the fast
#                                   paths' cuda tests
#   tools/gpu_session.sh bench      autotuned bench with plots (bench/results/<device>.json,
#                                   copied to $OUT with the tuning cache); commit the JSON
#                                   and run python -m bench.report
#
# Everything it prints is also written to $OUT/<stage>.log (OUT defaults to ./gpu-out).
set -uo pipefail
stage="${1:?usage: tools/gpu_session.sh probes|tests|sanitize|bench}"
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
log="$OUT/$stage.log"
FAST_PATH_TESTS="tests/test_conv2d_igemm.py tests/test_depthwise.py tests/test_depthwise_tc.py tests/test_autotune.py"
case "$stage" in
  probes)
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$log"
    python3 -m pytest -q -p no:cacheprovider tests/test_conv2d_igemm.py -k "mma or cvt or probe" 2>&1 | tee -a "$log"
    ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider -x --durations=20 2>&1 | tee "$log"
    ;;
  sanitize)
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 9 \
        python3 -m pytest -q -p no:cacheprovider -p no:xdist $FAST_PATH_TESTS -k cuda 2>&1 | tee -a "$log"
      echo "compute-sanitizer $tool exit ${PIPESTATUS[0]}" | tee -a "$log"
    done
    ;;
  bench)
    export CUCONV_AUTOTUNE=1 CUCONV_AUTOTUNE_CACHE="$OUT/autotune.json"
    python3 -m bench --op conv2d,conv_transpose2d,subpixel_conv2d --plot 2>&1 | tee "$log"
    cp bench/results/*.json bench/results/*.png "$OUT"/ 2>/dev/null
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
