"""CUCONV_SANITIZE (memcheck, racecheck, initcheck) on planted bugs in
tests/kernels/sanitizer_bugs.cu, each reported with its check, kernel, thread and line;
the same kernels with the bug turned off are not reported. record_accesses on probes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuconv
from cuconv import _interpret
from cuconv._kernels import KernelModule

KERNELS = Path(__file__).parent / "kernels"
BUGS = KernelModule(
    "sanitizer_bugs.cu",
    kernels=("oob_read", "oob_write", "missing_barrier", "uninitialized_shared", "misaligned", "warp_exchange"),
    params_struct="BugParams",
    dtypes=("float32",),
    directory=KERNELS,
)


def line_of(marker: str) -> str:
    """`sanitizer_bugs.cu:N` of the line marked `// BUG: marker`."""
    lines = (KERNELS / "sanitizer_bugs.cu").read_text().splitlines()
    (n,) = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"// BUG: {marker}")]
    return f"sanitizer_bugs.cu:{n}"


def run(kernel, n=64, block=32, fix=0, shared_bytes=0, in_elements=None):
    x = np.random.default_rng(0).standard_normal(in_elements or n).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    grid = ((n + block - 1) // block, 1, 1)
    _interpret.launch(BUGS, kernel, "float32", grid, (block, 1, 1), shared_bytes, BUGS.params(n=n, fix=fix),
                      [x, out])
    return x, out


@pytest.fixture
def sanitize(monkeypatch):
    monkeypatch.setenv("CUCONV_SANITIZE", "all")


def test_sanitizer_error_is_exported():
    assert cuconv.SanitizerError is _interpret.SanitizerError
    assert issubclass(cuconv.SanitizerError, RuntimeError)


def test_out_of_bounds_read(sanitize):
    with pytest.raises(cuconv.SanitizerError) as e:
        run("oob_read", n=64)
    message = str(e.value)
    assert message.startswith("memcheck: oob_read<float>: block (1, 0, 0), thread (30, 0, 0): ")
    assert "out-of-bounds read of 4 bytes 0 bytes past the end of argument 1, `in`, 256 bytes" in message
    assert line_of("oob_read") in message
    assert "and 1 more finding in this launch" in message  # thread 31 reads 4 bytes past the end


def test_out_of_bounds_write_is_not_performed(sanitize):
    x = np.zeros(65, np.float32)
    out = x[:64]  # the element past the end of `out` is x[64]: it must stay untouched
    with pytest.raises(cuconv.SanitizerError, match=re.escape(
            "memcheck: oob_write<float>: block (2, 0, 0), thread (0, 0, 0): out-of-bounds write of 4 bytes "
            "0 bytes past the end of argument 2, `out`, 256 bytes")) as e:
        _interpret.launch(BUGS, "oob_write", "float32", (3, 1, 1), (32, 1, 1), 0, BUGS.params(n=64, fix=0),
                          [np.zeros(64, np.float32), out])
    assert line_of("oob_write") in str(e.value)
    assert x[64] == 0
    np.testing.assert_array_equal(out, np.arange(64))


def test_removed_syncthreads_is_a_race(sanitize):
    with pytest.raises(cuconv.SanitizerError) as e:
        run("missing_barrier", n=64, block=64, shared_bytes=64 * 4)
    message = str(e.value)
    assert message.startswith("racecheck: missing_barrier<float>: block (0, 0, 0), thread (1, 0, 0): "
                              "write-after-read hazard on shared memory at byte 4 of dynamic shared memory")
    # both accesses: the write here, the neighbour's read on the line before the barrier that is gone
    barrier_read = int(line_of("missing_barrier").rpartition(":")[2]) - 2
    assert f"write of 4 bytes at {line_of('missing_barrier')} by thread (1, 0, 0)" in message
    assert f"earlier read at sanitizer_bugs.cu:{barrier_read} by thread (0, 0, 0)" in message


def test_read_of_unwritten_dynamic_shared_memory(sanitize):
    with pytest.raises(cuconv.SanitizerError) as e:
        run("uninitialized_shared", n=32, shared_bytes=32 * 4)
    message = str(e.value)
    assert message.startswith("initcheck: uninitialized_shared<float>: block (0, 0, 0), thread (0, 0, 0): read of 4 "
                              "bytes of shared memory no thread of the block has written, at byte 124 of dynamic "
                              "shared memory, 128 bytes")
    assert line_of("uninitialized_dynamic") in message


def test_read_of_unwritten_static_shared_memory(monkeypatch):
    monkeypatch.setenv("CUCONV_SANITIZE", "initcheck")
    # fix=1: every dynamic slot is written, the static `total` is not
    with pytest.raises(cuconv.SanitizerError, match=re.escape(
            "initcheck: uninitialized_shared<float>: block (0, 0, 0), thread (0, 0, 0): read of 4 bytes of shared "
            "memory no thread of the block has written, at byte ")) as e:
        run("uninitialized_shared", n=32, fix=1, shared_bytes=32 * 4)
    assert "of static shared memory" in str(e.value)
    assert line_of("uninitialized_static") in str(e.value)
    assert "and 31 more findings" in str(e.value)


def test_misaligned_access(sanitize):
    with pytest.raises(cuconv.SanitizerError) as e:
        run("misaligned", n=32, in_elements=64)
    message = str(e.value)
    assert message.startswith("memcheck: misaligned<float>: block (0, 0, 0), thread (0, 0, 0): misaligned read of 4 "
                              "bytes at byte 2 of argument 1, `in`, 256 bytes")
    assert line_of("misaligned") in message


def test_warp_synchronous_exchange_needs_syncwarp(sanitize):
    run("warp_exchange", n=64, block=64, fix=1)
    with pytest.raises(cuconv.SanitizerError, match=re.escape(
            "racecheck: warp_exchange<float>: block (0, 0, 0), thread (1, 0, 0): write-after-read hazard")) as e:
        run("warp_exchange", n=64, block=64, fix=0)
    assert f"at {line_of('warp_exchange_write')} by thread (1, 0, 0)" in str(e.value)
    assert f"earlier read at {line_of('warp_exchange')} by thread (0, 0, 0)" in str(e.value)


@pytest.mark.parametrize("kernel, fix, shared_bytes, in_elements",
                         [("oob_read", 1, 0, None), ("oob_write", 1, 0, None), ("missing_barrier", 1, 256, None),
                          ("uninitialized_shared", 3, 256, None), ("misaligned", 1, 0, 128),
                          ("warp_exchange", 1, 0, None)])
def test_fixed_kernels_are_not_reported(sanitize, kernel, fix, shared_bytes, in_elements):
    x, out = run(kernel, n=64, block=64, fix=fix, shared_bytes=shared_bytes, in_elements=in_elements)
    assert not np.isnan(out).any()


def test_check_subsets(monkeypatch):
    monkeypatch.setenv("CUCONV_SANITIZE", "memcheck")
    run("missing_barrier", n=64, block=64, shared_bytes=256)  # a race, but racecheck is off
    monkeypatch.setenv("CUCONV_SANITIZE", "racecheck,initcheck")
    with pytest.raises(cuconv.SanitizerError, match="^racecheck"):
        run("missing_barrier", n=64, block=64, shared_bytes=256)
    monkeypatch.setenv("CUCONV_SANITIZE", "memcheck,bogus")
    with pytest.raises(ValueError, match="bogus"):
        run("oob_read")


# --- record_accesses ---

PROBES = KernelModule("emulation_probe.cu", kernels=("probe_shuffles", "probe_shared"), params_struct="ProbeParams",
                      dtypes=("float32",), directory=KERNELS)


def test_recorded_coalesced_stores():
    """probe_shuffles' stores out[t*6 + k]: per (site, warp, nth) 32 lanes, stride 24 bytes;
    one site per k; every access global, in the `out` argument."""
    n = 128
    out = np.zeros((n, 6), np.float32)
    with _interpret.record_accesses() as traces:
        _interpret.launch(PROBES, "probe_shuffles", "float32", (2, 1, 1), (64, 1, 1), 0, PROBES.params(n=n), [out])
    (trace,) = traces
    assert trace.kernel == "probe_shuffles<float>" and trace.grid == (2, 1, 1) and trace.block == (64, 1, 1)
    assert trace.sampled_blocks == [0, 1] and list(trace.barriers) == [0, 0]
    assert trace.arguments == [("out", out.ctypes.data, out.nbytes)]
    a = trace.accesses
    assert a.dtype == _interpret.ACCESS_DTYPE
    stores = a[a["write"] == 1]
    assert len(stores) == n * 6 and set(stores["space"]) == {0} and set(stores["size"]) == {4}
    assert len(np.unique(stores["site"])) == 6
    lines = {trace.site_line(s) for s in np.unique(stores["site"])}
    assert lines <= {f"emulation_probe.cu:{i}" for i in (22, 23, 24)}
    for (site, block, warp), group in _groups(stores):
        assert len(group) == 32 and list(group["lane"]) == list(range(32))
        assert list(np.diff(group["address"].astype(np.int64))) == [24] * 31
        assert set(group["nth"]) == {0}


def _groups(a):
    keys = {}
    for i, r in enumerate(a):
        keys.setdefault((int(r["site"]), int(r["block"]), int(r["warp"])), []).append(i)
    return [(k, a[v]) for k, v in keys.items()]


def aligned(n: int, value: float) -> np.ndarray:
    """n float32 starting on a 128-byte boundary (NumPy guarantees 16)."""
    raw = np.full(n + 32, value, np.float32)
    skip = (-raw.ctypes.data % 128) // 4
    return raw[skip : skip + n]


def test_recorded_copy_is_four_sectors_per_request():
    """A coalesced copy (oob_read fixed, float32): 32 consecutive 4-byte addresses per
    (site, warp, nth) for the load of `in` and the store of `out`."""
    n = 256
    x, out = aligned(n, 1), aligned(n, 0)
    with _interpret.record_accesses() as traces:
        _interpret.launch(BUGS, "oob_read", "float32", (n // 64, 1, 1), (64, 1, 1), 0, BUGS.params(n=n, fix=1),
                          [x, out])
    a = traces[0].accesses
    a = a[a["space"] == 0]
    loads = a[(a["write"] == 0) & (a["address"] >= x.ctypes.data) & (a["address"] < x.ctypes.data + x.nbytes)]
    assert len(loads) == n
    for _, group in _groups(loads) + _groups(a[a["write"] == 1]):
        assert len(group) == 32
        assert list(np.diff(group["address"].astype(np.int64))) == [4] * 31
        assert len(np.unique(group["address"] // 32)) == 4


def test_sampled_blocks_run_only_those_blocks():
    n, block = 64 * 10, 64
    x, out = np.ones(n, np.float32), np.zeros(n, np.float32)
    with _interpret.record_accesses(sample_blocks=4) as traces:
        _interpret.launch(BUGS, "oob_read", "float32", (10, 1, 1), (block, 1, 1), 0, BUGS.params(n=n, fix=1),
                          [x, out])
    (trace,) = traces
    assert trace.sampled_blocks == [0, 3, 6, 9]
    assert sorted(set(trace.accesses["block"])) == [0, 3, 6, 9]
    ran = out.reshape(10, block).any(axis=1)
    assert list(np.flatnonzero(ran)) == [0, 3, 6, 9]


def test_recorded_barriers_and_shared_space():
    out = np.zeros((1, 64, 3), np.float64)
    probes = KernelModule("emulation_probe.cu", kernels=("probe_shared",), params_struct="ProbeParams",
                          dtypes=("float64",), directory=KERNELS)
    with _interpret.record_accesses() as traces:
        _interpret.launch(probes, "probe_shared", "float64", (1, 1, 1), (8, 4, 2), 64 * 8, probes.params(n=0), [out])
    (trace,) = traces
    assert trace.barriers[0] >= 1
    assert {0, 1} <= set(trace.accesses["space"])


def test_sampled_block_indices():
    assert _interpret.sampled_block_indices(10, 4) == [0, 3, 6, 9]
    assert _interpret.sampled_block_indices(3, 8) == [0, 1, 2]
    assert _interpret.sampled_block_indices(100, 2) == [0, 99]


# --- the kernel test files under CUCONV_SANITIZE=all ---

# The kernel test files CI runs sanitized (.ci/run); here a quick one of them, so a
# sanitizer regression on real kernels shows up in the default suite too.
def test_a_kernel_test_file_is_clean_under_all_checks():
    env = dict(os.environ, CUCONV_SANITIZE="all")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "tests/test_pixel_shuffle.py", "tests/test_interpret.py"],
                            cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
