"""The emulated profile (cuconv._profile): access analysis on hand-built traces, on probe
kernels whose profile is known by hand (tests/kernels/profile_probes.cu) and on real
launches; occupancy and the roofline against hand computations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cuconv import _interpret, _profile
from cuconv._kernels import KernelModule
from cuconv._profile import H100, analyze, ceilings, occupancy, roofline

ACCESS_DTYPE = np.dtype([("site", "u8"), ("block", "u4"), ("warp", "u4"), ("lane", "u1"), ("nth", "u4"),
                         ("address", "u8"), ("size", "u1"), ("write", "u1"), ("space", "u1")])
BASE = 1 << 20  # a 128-byte aligned stand-in address


@dataclass
class Trace:
    """A LaunchTrace built by hand."""

    accesses: np.ndarray
    grid: tuple = (1, 1, 1)
    block: tuple = (32, 1, 1)
    kernel: str = "probe<float>"
    shared_bytes: int = 0
    arguments: list = field(default_factory=list)
    sampled_blocks: list = field(default_factory=lambda: [0])
    barriers: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def site_line(self, site: int) -> str:
        return f"probe.cu:{site}"


def warp_access(addresses, size=4, write=0, space=0, site=1, nth=0, block=0, warp=0, lanes=None):
    lanes = range(len(addresses)) if lanes is None else lanes
    rows = np.zeros(len(addresses), ACCESS_DTYPE)
    rows["site"], rows["block"], rows["warp"], rows["nth"] = site, block, warp, nth
    rows["lane"], rows["address"] = list(lanes), addresses
    rows["size"], rows["write"], rows["space"] = size, write, space
    return rows


def profile_of(*parts, **kw):
    return analyze(Trace(np.concatenate(parts), **kw), resources=False)


lanes = np.arange(32)


def test_coalesced_float_load_is_4_sectors():
    p = profile_of(warp_access(BASE + 4 * lanes))
    assert (p.global_load.requests, p.global_load.per_request, p.global_load.ideal_per_request) == (1, 4, 4)
    assert p.global_load.bytes_requested == p.global_load.bytes_moved == 128
    assert p.global_load.active_lanes == 1.0


def test_arguments_are_placed_as_cudamalloc_would():
    # a host allocation 16 bytes off a 256-byte boundary: still 4 sectors, as on a GPU
    p = profile_of(warp_access(BASE + 16 + 4 * lanes), arguments=[("x", BASE + 16, 4096)])
    assert p.global_load.per_request == 4
    # an access 4 bytes into the argument stays misaligned: 5
    p = profile_of(warp_access(BASE + 20 + 4 * lanes), arguments=[("x", BASE + 16, 4096)])
    assert p.global_load.per_request == 5


def test_stride_32_float_load_is_32_sectors():
    p = profile_of(warp_access(BASE + 128 * lanes))
    assert (p.global_load.per_request, p.global_load.ideal_per_request) == (32, 4)
    assert p.global_load.bytes_moved == 32 * 32
    assert p.sites[0].excess == 28


def test_misaligned_and_wide_and_broadcast_global():
    # shifted by 4 bytes: 128 bytes over 5 sectors
    assert profile_of(warp_access(BASE + 4 + 4 * lanes)).global_load.per_request == 5
    # 16-byte vector loads, consecutive: 512 bytes = 16 sectors, all of them needed
    p = profile_of(warp_access(BASE + 16 * lanes, size=16))
    assert (p.global_load.per_request, p.global_load.ideal_per_request) == (16, 16)
    # every lane on one float: one sector
    assert profile_of(warp_access([BASE] * 32)).global_load.per_request == 1


def test_requests_split_by_nth_block_warp_and_kind():
    loop = [warp_access(BASE + 128 * i + 4 * lanes, nth=i) for i in range(3)]
    stores = warp_access(BASE + 4 * lanes, write=1, site=2)
    other_warp = warp_access(BASE + 4 * lanes, warp=1)
    p = profile_of(*loop, stores, other_warp)
    assert p.global_load.requests == 4 and p.global_store.requests == 1
    assert p.global_store.per_request == 4


def test_sites_of_one_line_are_reported_together():
    p = profile_of(warp_access(BASE + 128 * lanes, site=7), warp_access(BASE + 128 * lanes, site=7 + 1000))
    lines = {s.site for s in p.sites}
    assert lines == {"probe.cu:7", "probe.cu:1007"}
    trace = Trace(np.concatenate([warp_access(BASE + 4 * lanes, site=1), warp_access(BASE + 128 * lanes, site=2)]))
    trace.site_line = lambda site: "probe.cu:1"  # two inlined copies of one line
    (site,) = analyze(trace, resources=False).sites
    assert (site.requests, site.per_request, site.excess) == (2, 18, 28)


def test_divergence_is_the_active_lane_fraction():
    half = warp_access(BASE + 4 * lanes[:16], lanes=lanes[:16])
    full = warp_access(BASE + 4 * lanes, nth=1)
    p = profile_of(half, full)
    assert p.global_load.active_lanes == pytest.approx(0.75)
    assert p.sites[0].active_lanes == pytest.approx(0.75)


def test_shared_conflict_free_broadcast_and_32_way():
    assert profile_of(warp_access(BASE + 4 * lanes, space=1)).shared_load.per_request == 1
    assert profile_of(warp_access([BASE + 8] * 32, space=1)).shared_load.per_request == 1  # broadcast
    p = profile_of(warp_access(BASE + 128 * lanes, space=1))  # one column of a 32x32 float tile
    assert (p.shared_load.per_request, p.shared_load.ideal_per_request) == (32, 1)
    assert p.sites[0].excess == 31
    # a padded 33-float row: conflict-free again
    assert profile_of(warp_access(BASE + 132 * lanes, space=1)).shared_load.per_request == 1
    # stride 2 floats: two lanes per bank on distinct words
    assert profile_of(warp_access(BASE + 8 * lanes, space=1)).shared_load.per_request == 2


def test_shared_wide_accesses_go_in_phases():
    # 8-byte consecutive: two half-warps, each conflict-free
    p = profile_of(warp_access(BASE + 8 * lanes, size=8, space=1))
    assert (p.shared_load.per_request, p.shared_load.ideal_per_request) == (2, 2)
    # 16-byte consecutive: four quarter-warps
    assert profile_of(warp_access(BASE + 16 * lanes, size=16, space=1)).shared_load.per_request == 4
    # 16-byte with a 256-byte stride: in a quarter-warp 8 lanes on the same 4 banks
    assert profile_of(warp_access(BASE + 256 * lanes, size=16, space=1)).shared_load.per_request == 4 * 8
    # 2-byte halves: two lanes share a word (broadcast), 1 wavefront
    assert profile_of(warp_access(BASE + 2 * lanes, size=2, space=1)).shared_load.per_request == 1


def test_barriers_and_dram_traffic_scaled_to_the_grid():
    # 4 blocks each read their own 128 bytes of a 1 KB argument and a shared 128-byte
    # weight; 2 of 16 blocks sampled
    acc = [warp_access(BASE + 128 * b + 4 * lanes, block=b) for b in (0, 15)]
    acc += [warp_access(BASE + 4096 + 4 * lanes, block=b, site=2) for b in (0, 15)]
    p = profile_of(*acc, grid=(16, 1, 1), sampled_blocks=[0, 15], barriers=np.array([3, 5]),
                   arguments=[("x", BASE, 2048), ("w", BASE + 4096, 128)])
    assert p.barriers_per_block == 4
    # x: 8 sectors in 2 blocks -> 64 over 16 blocks (its own 64 sectors); w: capped at 4
    assert p.dram_bytes == (64 + 4) * 32
    # without reuse across blocks every block fetches its 4 + 4 sectors
    assert p.block_footprint_bytes == 16 * 8 * 32
    assert p.compulsory_bytes == 2048 + 128


def test_occupancy_hand_computed():
    # 256 threads, 32 registers: 8 warps/block; 1024 registers/warp, 16 warps per
    # sub-partition -> 64 warps: 8 blocks by registers = by threads
    o = occupancy(256, 32, 0)
    assert (o.blocks_per_sm, o.warps_per_sm, o.occupancy) == (8, 64, 1.0)
    # 128 threads, 128 registers: 4096/warp -> 4 warps per sub-partition, 16 per SM -> 4 blocks
    o = occupancy(128, 128, 0)
    assert (o.blocks_per_sm, o.warps_per_sm, o.limiter) == (4, 16, "registers")
    # 72 registers round to 2304/warp: 7 per sub-partition (16384 // 2304), 28 warps -> 3 blocks of 8
    o = occupancy(256, 72, 0)
    assert (o.blocks_per_sm, o.warps_per_sm) == (3, 24)
    # 48 KB shared + 1 KB reserve: 228 KB // 49 KB = 4 blocks
    o = occupancy(128, 32, 48 * 1024)
    assert (o.blocks_per_sm, o.limiter) == (4, "shared memory")
    # 32-thread blocks: capped at 32 blocks per SM = 32 warps
    o = occupancy(32, 16, 0)
    assert (o.blocks_per_sm, o.warps_per_sm, o.limiter) == (32, 32, "blocks")
    # over the per-block maximum: nothing fits
    assert occupancy(128, 32, 228 * 1024).blocks_per_sm == 0


def test_roofline_hand_computed(tmp_path):
    c = ceilings(results_dir=tmp_path)  # no results: datasheet
    assert c.dram_bytes_per_s == 3.35e12 and "datasheet" in c.source
    # 3.35 GB at 3.35 TB/s = 1 ms; 67 GFLOP fp32 at 67 TFLOP/s = 1 ms; 134 GFLOP = 2 ms
    r = roofline(3.35e9, 1e9, 134e9, "fp32", c)
    assert r.memory_s == pytest.approx(1e-3) and r.compute_s == pytest.approx(2e-3)
    assert r.bound_s == pytest.approx(2e-3) and r.bound_by == "compute"
    r = roofline(3.35e9, 1e9, 989e9, "fp16/bf16 tensor", c)
    assert r.bound_s == pytest.approx(1e-3) and r.bound_by == "memory"
    assert roofline(3.35e9, 1e9, None, "fp32", c).bound_s == pytest.approx(1e-3)


def test_roofline_takes_measured_ceilings(tmp_path):
    (tmp_path / "gpu.json").write_text('{"ceilings": {"copy_gbs": 2000, "gemm_tflops": 500, "gemm": "bf16"}}')
    c = ceilings(results_dir=tmp_path)
    assert c.dram_bytes_per_s == 2e12 and c.peaks["fp16/bf16 tensor"] == 500e12 and "measured" in c.source
    assert c.peaks["fp32"] == H100.peaks["fp32"]


def test_compute_unit():
    assert _profile.compute_unit("float16", True) == "fp16/bf16 tensor"
    assert _profile.compute_unit("float32", True) == "tf32 tensor"
    assert _profile.compute_unit("float16", False) == "fp32"
    assert _profile.compute_unit("float64", False) == "fp64"


# --------------------------------------------------------------------------- real launches

def test_pixel_shuffle_is_profiled_end_to_end(capsys):
    from cuconv.cli import main

    assert main(["profile", "pixel_shuffle", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert "EMULATED" in out and "pixel_shuffle_fwd<float>" in out and "roofline (MODEL" in out


def test_real_launch_records_every_sampled_block():
    import cuconv

    x = np.random.default_rng(0).standard_normal((2, 16, 9, 9)).astype(np.float32)
    traces = _profile.record(lambda: cuconv.pixel_shuffle(x, 2), sample_blocks=3)
    assert traces and all(len(t.sampled_blocks) <= 3 for t in traces)
    p = analyze(traces[0])
    assert p.global_load.requests > 0 and p.global_store.requests > 0
    assert p.global_load.per_request >= p.global_load.ideal_per_request > 0


# --- probe kernels with hand-computed profiles (tests/kernels/profile_probes.cu) ---

PROBES = KernelModule("profile_probes.cu", kernels=("strided_copy", "shared_stride"),
                      params_struct="ProfileProbeParams", dtypes=("float32",),
                      directory=Path(__file__).parent / "kernels")


def _probe_profile(kernel: str, stride: int, n: int = 64):
    x = np.random.default_rng(0).standard_normal(n * stride).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    with _interpret.record_accesses() as traces:
        _interpret.launch(PROBES, kernel, "float32", (n // 32, 1, 1), (32, 1, 1), 0,
                          PROBES.params(n=n, stride=stride), [x, out])
    (trace,) = traces
    return analyze(trace, resources=False), x, out


@pytest.mark.parametrize("stride, sectors", [(1, 4), (2, 8), (32, 32)])
def test_strided_copy_probe(stride, sectors):
    p, x, out = _probe_profile("strided_copy", stride)
    np.testing.assert_array_equal(out, x[::stride])
    assert p.global_load.requests == 2 and p.global_load.per_request == sectors
    assert p.global_load.bytes_moved == 2 * sectors * 32 and p.global_load.bytes_requested == 2 * 32 * 4
    assert p.global_store.requests == 2 and p.global_store.per_request == 4
    assert p.global_load.active_lanes == 1.0


@pytest.mark.parametrize("stride, wavefronts", [(1, 1), (2, 2), (33, 1), (32, 32)])
def test_shared_stride_probe(stride, wavefronts):
    p, x, out = _probe_profile("shared_stride", stride)
    np.testing.assert_array_equal(out, x[: len(out)])
    assert p.shared_store.requests == 2 and p.shared_store.per_request == wavefronts
    assert p.shared_load.requests == 2 and p.shared_load.per_request == wavefronts
    assert p.shared_load.ideal_per_request == 1
    assert p.barriers_per_block == 1
