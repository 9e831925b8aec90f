"""The CUDA emulation of the interpret backend, checked feature by feature with the
probe kernels in tests/kernels/emulation_probe.cu (and on the GPU too, when one is
present, so both backends are held to the same expectations)."""

from pathlib import Path

import numpy as np
import pytest

from cuconv import _interpret
from cuconv._kernels import KernelModule
from conftest import to_backend, to_numpy

PROBES = KernelModule(
    "emulation_probe.cu",
    kernels=("probe_shuffles", "probe_votes", "probe_atomics", "probe_shared", "probe_deadlock"),
    params_struct="ProbeParams",
    dtypes=("float32", "float64"),
    directory=Path(__file__).parent / "kernels",
)


def run_probe(backend, kernel, dtype, grid, block, n, out, shared_bytes=0):
    out = to_backend(out, backend)
    params = PROBES.params(n=n)
    if backend == "interpret":
        _interpret.launch(PROBES, kernel, dtype, grid, block, shared_bytes, params, [out])
    else:
        import cupy

        from cuconv import _cuda

        _cuda.launch(PROBES, kernel, dtype, grid, block, shared_bytes, params, [out], 0,
                     cupy.cuda.get_current_stream())
    return to_numpy(out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_warp_shuffles(backend, dtype):
    blocks, threads = 2, 64
    n = blocks * threads
    out = run_probe(backend, "probe_shuffles", dtype, (blocks, 1, 1), (threads, 1, 1), n,
                    np.full((n, 6), np.nan, dtype)).reshape(blocks, threads, 6)
    tid = np.arange(threads)
    lane, warp_base = tid % 32, tid - tid % 32
    for b in range(blocks):
        value = lambda src_tid: 100 * b + src_tid  # noqa: E731
        np.testing.assert_array_equal(out[b, :, 0], value(warp_base + 31 - lane))
        np.testing.assert_array_equal(out[b, :, 1], value(np.where(lane + 3 < 32, tid + 3, tid)))
        np.testing.assert_array_equal(out[b, :, 2], value(np.where(lane >= 5, tid - 5, tid)))
        np.testing.assert_array_equal(out[b, :, 3], value(warp_base + (lane ^ 7)))
        np.testing.assert_array_equal(out[b, :, 4], value(warp_base + (lane & ~7) + 2))
        np.testing.assert_array_equal(out[b, :, 5], np.where(lane == 0, 528, out[b, :, 5]))  # lane 0 holds the sum


def test_warp_votes(backend):
    n = 96
    out = run_probe(backend, "probe_votes", "float32", (1, 1, 1), (96, 1, 1), n,
                    np.full((n, 3), np.nan, np.float32))
    np.testing.assert_array_equal(out, np.tile([16, 1, 0], (n, 1)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_atomics_across_concurrent_blocks(backend, dtype):
    n = 3000
    out = run_probe(backend, "probe_atomics", dtype, (12, 1, 1), (256, 1, 1), n, np.zeros(2, dtype))
    np.testing.assert_array_equal(out, [n * (n + 1) / 2, n])


def test_static_and_dynamic_shared_memory_with_3d_blocks(backend):
    blocks, block = 3, (8, 4, 2)
    nthreads = 64
    out = run_probe(backend, "probe_shared", "float64", (blocks, 1, 1), block, 0,
                    np.full((blocks, nthreads, 3), np.nan), shared_bytes=nthreads * 8)
    me = np.arange(nthreads)
    for b in range(blocks):
        np.testing.assert_array_equal(out[b, :, 0], nthreads - 1 - me + 1000 * b)
        np.testing.assert_array_equal(out[b, :, 1], np.full(nthreads, me.sum() + 1000 * b * nthreads))
        x, y, z = me % 8, (me // 8) % 4, me // 32
        np.testing.assert_array_equal(out[b, :, 2], x * 10000 + y * 100 + z)


def test_divergent_barrier_is_reported_not_hung():
    with pytest.raises(RuntimeError, match="barrier deadlock"):
        run_probe("interpret", "probe_deadlock", "float32", (1, 1, 1), (32, 1, 1), 0, np.zeros(32, np.float32))


def test_shared_memory_over_the_limit_is_refused():
    with pytest.raises(RuntimeError, match="shared memory"):
        run_probe("interpret", "probe_shared", "float64", (1, 1, 1), (32, 1, 1), 0,
                  np.zeros((1, 32, 3)), shared_bytes=_interpret.MAX_SHARED_BYTES + 1)


def test_header_edit_changes_the_compiled_source(tmp_path):
    """An edited header changes the inlined text, hence the compile-cache key: the next
    process (here: a fresh KernelModule) compiles and runs the new code."""
    (tmp_path / "inc").mkdir()
    header = tmp_path / "inc" / "h.cuh"
    (tmp_path / "k.cu").write_text('#include "inc/h.cuh"\nstruct P { long long n; };\n'
                                   "template <typename T> __global__ void k(const P p, T* out) { out[0] = T(PROBE_VALUE); }\n")

    def run():
        module = KernelModule("k.cu", kernels=("k",), params_struct="P", dtypes=("float32",), directory=tmp_path)
        out = np.zeros(1, np.float32)
        _interpret.launch(module, "k", "float32", (1, 1, 1), (32, 1, 1), 0, module.params(n=0), [out])
        return module.source_hash, out[0]

    header.write_text("#pragma once\n#define PROBE_VALUE 1\n")
    first_hash, first_value = run()
    header.write_text("#pragma once\n#define PROBE_VALUE 2\n")
    second_hash, second_value = run()
    assert (first_value, second_value) == (1, 2)
    assert first_hash != second_hash
