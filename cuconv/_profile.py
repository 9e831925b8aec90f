"""`cuconv profile`: what Nsight Compute's memory analysis would say about a kernel launch,
computed from the interpret backend's record of every memory access (EMULATED), plus an
occupancy and a roofline MODEL for an H100 SXM. No GPU is involved anywhere.

The input is one `LaunchTrace` per launch (cuconv._interpret.record_accesses): each row
of `trace.accesses` is one lane's access (site, block, warp, lane, nth, address, size,
write, space), `nth` being the lane's n-th execution of that site within its block.

Models (docs/profile.md states them with their limits):

- A *request* is one warp-wide execution of one access instruction: the rows sharing
  (site, block, warp, nth, write). Loads and stores are counted apart.
- Global memory: a request moves every 32-byte sector any of its lanes touches; its ideal
  is ceil(distinct bytes / 32) sectors (4 for 32 lanes reading consecutive floats).
- Shared memory: 32 banks of 4 bytes. A request is served in phases: the whole warp for
  accesses of up to 4 bytes, half-warps (lanes 0-15, 16-31) for 8-byte accesses,
  quarter-warps for 16-byte ones. A phase takes as many wavefronts as the largest number
  of distinct 4-byte words it touches in one bank (lanes on the same word are a
  broadcast); the request's wavefronts are the sum over its phases, its ideal the
  number of phases that have an active lane.
- DRAM traffic with an infinite L2: the distinct sectors the sampled blocks touch in each
  argument, times grid blocks / sampled blocks, capped at the argument's own sectors
  (a buffer every block reads, like a weight, is fetched once). Compared with the
  compulsory bytes: each argument's size once.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SECTOR = 32
WARP = 32
BANKS = 32

# --------------------------------------------------------------------------- device model


@dataclass(frozen=True)
class Device:
    """The per-SM limits occupancy depends on, and the datasheet peaks."""

    name: str = "H100 SXM"
    sms: int = 132
    registers_per_sm: int = 65536
    register_sub_partitions: int = 4  # each scheduler owns a quarter of the register file
    register_granularity: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    shared_reserved_per_block: int = 1024  # the runtime's own shared memory per block (sm_80+)
    shared_granularity: int = 128
    dram_bytes_per_s: float = 3.35e12  # HBM3
    # FLOP/s of the unit a kernel's inner loop runs on (dense, no sparsity)
    peaks: dict = field(default_factory=lambda: {
        "fp32": 67e12, "fp64": 34e12, "fp64 tensor": 67e12, "tf32 tensor": 494e12,
        "fp16/bf16 tensor": 989e12})


H100 = Device()


@dataclass(frozen=True)
class Occupancy:
    threads_per_block: int
    registers: int | None  # per thread; None: unknown, no register limit applied
    shared_bytes: int  # per block: static + dynamic (the runtime's reserve not included)
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # warps_per_sm / the SM's maximum
    limiter: str  # threads, blocks, registers or shared memory
    limits: dict  # blocks/SM allowed by each resource


def occupancy(threads_per_block: int, registers: int | None, shared_bytes: int, device: Device = H100) -> Occupancy:
    """Resident blocks per SM, as CUDA's occupancy calculator computes it."""
    warps = -(-threads_per_block // WARP)
    max_warps = device.threads_per_sm // WARP
    limits = {"threads": max_warps // warps, "blocks": device.blocks_per_sm}
    if registers:
        per_warp = -(-registers * WARP // device.register_granularity) * device.register_granularity
        # A warp's registers come from one sub-partition's file, so what is left over in
        # each quarter cannot be pooled.
        warps_by_regs = (device.registers_per_sm // device.register_sub_partitions // per_warp
                         * device.register_sub_partitions)
        limits["registers"] = warps_by_regs // warps
    smem = shared_bytes + device.shared_reserved_per_block
    smem = -(-smem // device.shared_granularity) * device.shared_granularity
    limits["shared memory"] = device.shared_per_sm // smem if shared_bytes <= device.shared_per_block else 0
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(threads_per_block, registers, shared_bytes, blocks, blocks * warps, blocks * warps / max_warps,
                     limiter, limits)


@functools.cache
def _module_resources(filename: str, arch: str) -> dict:
    """NVRTC's (registers, static shared bytes) of every instantiation in one module:
    compiled once, then kept on disk beside the interpret cache, keyed by the source text
    and the NVRTC version (a large module takes NVRTC half a minute)."""
    from . import _interpret
    from ._nvrtc import compile_to_cubin, nvrtc_version
    from .check import selected_modules

    module = selected_modules([filename])[0]
    key = f"{module.source_hash[:24]}-{arch}-nvrtc{'.'.join(map(str, nvrtc_version()))}"
    path = _interpret.cache_dir().parent / "resources" / f"{Path(filename).stem}-{key}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        pass
    result = compile_to_cubin(module.source(), module.name_expressions, arch=arch, program_name=module.filename)
    found = {k: (r.registers, r.shared_bytes) for k, r in result.resources.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(found))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return found


def kernel_resources(name_expression: str, arch: str = "sm_90"):
    """(registers, static shared bytes) of a kernel instantiation such as
    'pixel_shuffle_fwd<float>', or (None, None, reason) when NVRTC cannot say."""
    from .check import all_modules

    module = next((m for m in all_modules() if name_expression in m.name_expressions), None)
    if module is None:
        return None, None, f"{name_expression} is not an instantiation of a kernels_cu module"
    try:
        registers, shared = _module_resources(module.filename, arch)[name_expression]
    except Exception as e:  # no NVRTC wheel, or a compile error: the rest of the profile still stands
        return None, None, f"NVRTC unavailable ({type(e).__name__}: {str(e).splitlines()[0]})"
    return registers, shared, None


def uses_tensor_cores(name_expression: str) -> bool:
    """Whether the kernel's .cu file includes the mma helpers (tensor-core kernels)."""
    from .check import all_modules

    module = next((m for m in all_modules() if name_expression in m.name_expressions), None)
    return module is not None and "mma.cuh" in module.path.read_text()


# --------------------------------------------------------------------------- grouping


def _group(*columns):
    """Dense group ids of the rows by the tuple of columns (ids in sorted key order), and
    the group count."""
    n = len(columns[0])
    if n == 0:
        return np.zeros(0, np.int64), 0
    # one sort of a packed int64 key where the columns' ranges fit in 62 bits (the usual
    # case, and several times faster than sorting on every column)
    lows = [int(c.min()) for c in columns]
    spans = [int(c.max()) - lo + 1 for c, lo in zip(columns, lows)]
    if math.prod(spans) < 1 << 62:
        key = np.zeros(n, np.int64)
        for c, lo, span in zip(columns, lows, spans):
            key = key * span + (c.astype(np.int64) - lo)
        _, ids = np.unique(key, return_inverse=True)
        return ids.reshape(-1), int(ids.max()) + 1
    order = np.lexsort(columns[::-1])
    change = np.zeros(n, bool)
    change[0] = True
    for c in columns:
        s = c[order]
        change[1:] |= s[1:] != s[:-1]
    ids = np.empty(n, np.int64)
    ids[order] = np.cumsum(change) - 1
    return ids, int(ids[order[-1]]) + 1


def _first(ids, count, values):
    out = np.zeros(count, values.dtype)
    out[ids] = values
    return out


def _distinct_count(ids, count, values):
    """Per group: the number of distinct values."""
    pair, _ = _group(ids, values)
    keep = np.zeros(len(pair), bool)
    keep[np.unique(pair, return_index=True)[1]] = True
    return np.bincount(ids[keep], minlength=count)


# --------------------------------------------------------------------------- analysis


@dataclass
class SiteStats:
    site: str  # file.cu:line
    space: str  # global or shared
    kind: str  # load or store
    requests: int
    per_request: float  # sectors (global) or wavefronts (shared)
    ideal_per_request: float
    active_lanes: float  # mean fraction of the 32 lanes present in a request
    excess: int  # sectors or wavefronts above the ideal, summed over the sampled requests


@dataclass
class AccessStats:
    requests: int = 0
    per_request: float = 0.0  # sectors/request (global) or wavefronts/request (shared)
    ideal_per_request: float = 0.0
    bytes_requested: int = 0  # what the lanes asked for (a broadcast counts each lane)
    bytes_moved: int = 0  # global: sectors x 32
    active_lanes: float = 0.0


@dataclass
class LaunchProfile:
    kernel: str
    grid: tuple
    block: tuple
    grid_blocks: int
    sampled_blocks: int
    global_load: AccessStats
    global_store: AccessStats
    shared_load: AccessStats
    shared_store: AccessStats
    barriers_per_block: float
    dram_bytes: float  # modelled with an infinite L2, scaled to the grid
    block_footprint_bytes: float  # the blocks' own distinct sectors summed: no reuse across blocks
    compulsory_bytes: int
    sites: list  # SiteStats, worst first
    occupancy: Occupancy | None
    occupancy_note: str | None
    registers: int | None
    static_shared_bytes: int | None
    shared_bytes: int  # dynamic, as launched
    tensor_cores: bool


def _site_names(trace, sites):
    return [trace.site_line(int(s)) for s in sites]


def _by_line(trace, site, mask):
    """(file.cu:line, request mask) per source line among the masked requests: the sites
    of one line (a helper inlined twice) are reported together."""
    lines = {}
    for s in np.unique(site[mask]):
        lines.setdefault(trace.site_line(int(s)), []).append(s)
    return [(line, mask & np.isin(site, ids)) for line, ids in lines.items()]


def _global(trace, acc):
    if len(acc) == 0:
        return {"load": AccessStats(), "store": AccessStats()}, []
    req, n = _group(acc["site"], acc["block"], acc["warp"], acc["nth"], acc["write"])
    addr, size = acc["address"].astype(np.int64), acc["size"].astype(np.int64)
    first, last = addr // SECTOR, (addr + size - 1) // SECTOR
    straddle = first != last  # a misaligned access touches the next sector too
    sectors = _distinct_count(np.concatenate([req, req[straddle]]), n, np.concatenate([first, last[straddle]]))
    # distinct bytes: a broadcast (lanes on one address) is fetched once
    _, where = np.unique(_group(req, addr)[0], return_index=True)
    distinct = np.bincount(req[where], weights=size[where], minlength=n)
    ideal = np.ceil(distinct / SECTOR)
    return _by_kind(trace, "global", acc, req, n, sectors, ideal, moved=sectors * SECTOR)


def _shared(trace, acc):
    if len(acc) == 0:
        return {"load": AccessStats(), "store": AccessStats()}, []
    req, n = _group(acc["site"], acc["block"], acc["warp"], acc["nth"], acc["write"])
    addr, size = acc["address"].astype(np.int64), acc["size"].astype(np.int64)
    lane = acc["lane"].astype(np.int64)
    # lanes served together: the whole warp up to 4 bytes, 16 lanes at 8, 8 lanes at 16
    phase = lane // (WARP // np.clip(size // 4, 1, 4))
    first, last = addr // 4, (addr + size - 1) // 4
    words_per = last - first + 1
    rows = np.repeat(np.arange(len(acc)), words_per)
    word = first[rows] + (np.arange(len(rows)) - np.repeat(np.cumsum(words_per) - words_per, words_per))
    # one row per distinct (request, phase, word): lanes on the same word broadcast
    key, _ = _group(req[rows], phase[rows], word)
    _, keep = np.unique(key, return_index=True)
    r_req, r_phase, r_bank = req[rows][keep], phase[rows][keep], word[keep] % BANKS
    bank_group, nb = _group(r_req, r_phase, r_bank)
    per_bank = np.bincount(bank_group, minlength=nb)
    b_req, b_phase = _first(bank_group, nb, r_req), _first(bank_group, nb, r_phase)
    phase_group, npg = _group(b_req, b_phase)
    per_phase = np.zeros(npg, np.int64)
    np.maximum.at(per_phase, phase_group, per_bank)
    wavefronts = np.bincount(_first(phase_group, npg, b_req), weights=per_phase, minlength=n)
    ideal = np.bincount(_first(phase_group, npg, b_req), minlength=n).astype(float)
    return _by_kind(trace, "shared", acc, req, n, wavefronts, ideal, moved=np.zeros(n))


def _by_kind(trace, space: str, acc, req, n: int, cost, ideal, moved):
    """AccessStats for loads and for stores, and SiteStats per source line, from each
    request's cost (sectors or wavefronts), its ideal cost and the bytes it moved."""
    stats, sites = {}, []
    lanes = _distinct_count(req, n, acc["lane"].astype(np.int64))
    requested = np.bincount(req, weights=acc["size"].astype(np.int64), minlength=n)
    write, site = _first(req, n, acc["write"]), _first(req, n, acc["site"])
    for w, kind in ((0, "load"), (1, "store")):
        m = write == w
        r = int(m.sum())
        stats[kind] = AccessStats(r, float(cost[m].mean()) if r else 0.0, float(ideal[m].mean()) if r else 0.0,
                                  int(requested[m].sum()), int(moved[m].sum()),
                                  float(lanes[m].mean() / WARP) if r else 0.0)
        for line, k in _by_line(trace, site, m):
            sites.append(SiteStats(line, space, kind, int(k.sum()), float(cost[k].mean()),
                                   float(ideal[k].mean()), float(lanes[k].mean() / WARP),
                                   int((cost[k] - ideal[k]).sum())))
    return stats, sites


def _dram_bytes(trace, acc, grid_blocks: int, sampled: int) -> float:
    """Modelled DRAM bytes with an infinite L2 (see the module docstring)."""
    if len(acc) == 0:
        return 0.0
    addr, size = acc["address"].astype(np.int64), acc["size"].astype(np.int64)
    sectors = np.unique(np.concatenate([addr // SECTOR, (addr + size - 1) // SECTOR]))
    scale = grid_blocks / max(sampled, 1)
    total, inside = 0.0, np.zeros(len(sectors), bool)
    for _, start, nbytes in {(a, n): (name, a, n) for name, a, n in trace.arguments}.values():
        if nbytes <= 0:
            continue
        start -= start % 256  # where _as_on_device put it
        lo, hi = start // SECTOR, (start + nbytes - 1) // SECTOR
        mine = (sectors >= lo) & (sectors <= hi)
        inside |= mine
        total += min(mine.sum() * scale, hi - lo + 1)
    total += (~inside).sum() * scale  # outside every argument: nothing to cap with
    return total * SECTOR


def _block_footprint_bytes(acc, grid_blocks: int, sampled: int) -> float:
    """Bytes fetched if no block found another block's data in L2: the sum over blocks of
    each one's distinct sectors (sampled blocks, scaled to the grid)."""
    if len(acc) == 0:
        return 0.0
    addr, size = acc["address"].astype(np.int64), acc["size"].astype(np.int64)
    block = np.concatenate([acc["block"], acc["block"]]).astype(np.int64)
    sectors = np.concatenate([addr // SECTOR, (addr + size - 1) // SECTOR])
    return _group(block, sectors)[1] * SECTOR * grid_blocks / max(sampled, 1)


def _as_on_device(trace, acc):
    """The accesses with each argument moved to a 256-byte boundary, as cudaMalloc places
    it: a host allocator's 16-byte alignment would otherwise split sectors a GPU does not."""
    args = sorted({(a, n) for _, a, n in trace.arguments if n > 0})
    if not args or len(acc) == 0:
        return acc
    starts = np.array([a for a, _ in args], np.uint64)
    ends = np.array([a + n for a, n in args], np.uint64)
    i = np.searchsorted(starts, acc["address"], side="right") - 1
    inside = (i >= 0) & (acc["address"] < ends[np.maximum(i, 0)])
    out = acc.copy()
    out["address"][inside] -= starts[i[inside]] % np.uint64(256)
    return out


def analyze(trace, device: Device = H100, resources: bool = True) -> LaunchProfile:
    """The emulated profile of one launch. `resources=False` skips NVRTC (occupancy then
    counts the launch's dynamic shared memory and no register limit)."""
    acc = trace.accesses
    grid_blocks = math.prod(trace.grid)
    sampled = len(trace.sampled_blocks)
    g, s = _as_on_device(trace, acc[acc["space"] == 0]), acc[acc["space"] == 1]
    gstats, gsites = _global(trace, g)
    sstats, ssites = _shared(trace, s)
    sites = sorted(gsites + ssites, key=lambda x: (-x.excess, -x.requests))
    barriers = float(np.mean(trace.barriers)) if len(trace.barriers) else 0.0
    compulsory = sum(n for (_, n) in {(a, n) for _, a, n in trace.arguments})
    registers = static = note = None
    if resources:
        registers, static, note = kernel_resources(trace.kernel)
    threads = math.prod(trace.block)
    occ = occupancy(threads, registers, (static or 0) + trace.shared_bytes, device)
    if note:
        note = f"{note}: dynamic shared memory only, no register limit"
    return LaunchProfile(trace.kernel, tuple(trace.grid), tuple(trace.block), grid_blocks, sampled,
                         gstats["load"], gstats["store"], sstats["load"], sstats["store"], barriers,
                         _dram_bytes(trace, g, grid_blocks, sampled),
                         _block_footprint_bytes(g, grid_blocks, sampled), compulsory, sites, occ, note,
                         registers, static, trace.shared_bytes, resources and uses_tensor_cores(trace.kernel))


# --------------------------------------------------------------------------- roofline


@dataclass
class Ceilings:
    dram_bytes_per_s: float
    peaks: dict
    source: str


def ceilings(device: Device = H100, results_dir: Path | None = None) -> Ceilings:
    """The datasheet figures, or the bench's measured ones where a results file has them:
    its copy bandwidth for DRAM and its GEMM for the fp16/bf16 tensor peak."""
    if results_dir is None:
        results_dir = Path(__file__).resolve().parent.parent / "bench" / "results"
    peaks = dict(device.peaks)
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            c = json.loads(path.read_text())["ceilings"]
            peaks["fp16/bf16 tensor"] = c["gemm_tflops"] * 1e12
            return Ceilings(c["copy_gbs"] * 1e9, peaks, f"measured ({path.name}: copy and {c.get('gemm', 'GEMM')}; "
                                                        f"other units from the {device.name} datasheet)")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return Ceilings(device.dram_bytes_per_s, peaks, f"{device.name} datasheet (no measured ceilings in bench/results)")


def compute_unit(dtype: str, tensor_cores: bool) -> str:
    """The unit a kernel's multiply-adds run on: fp16/bf16 and fp32 direct kernels
    accumulate in fp32 on the FP32 pipes."""
    if dtype == "float64":
        return "fp64 tensor" if tensor_cores else "fp64"
    if tensor_cores:
        return "tf32 tensor" if dtype == "float32" else "fp16/bf16 tensor"
    return "fp32"


@dataclass
class Roofline:
    flops: float | None
    unit: str
    dram_bytes: float
    compulsory_bytes: float
    memory_s: float  # modelled DRAM bytes / bandwidth
    compulsory_s: float
    compute_s: float | None
    bound_s: float  # the model's lower bound on the time
    bound_by: str
    ceilings: str


def roofline(dram_bytes: float, compulsory_bytes: float, flops: float | None, unit: str,
             c: Ceilings | None = None) -> Roofline:
    c = c or ceilings()
    memory = dram_bytes / c.dram_bytes_per_s
    compute = flops / c.peaks[unit] if flops else None
    bound_by = "compute" if compute is not None and compute > memory else "memory"
    return Roofline(flops, unit, dram_bytes, compulsory_bytes, memory, compulsory_bytes / c.dram_bytes_per_s,
                    compute, max(memory, compute or 0.0), bound_by, c.source)


# --------------------------------------------------------------------------- running an op


def record(fn, sample_blocks: int | None):
    """The LaunchTraces of every launch `fn()` makes on the interpret backend."""
    from . import _interpret

    if not hasattr(_interpret, "record_accesses"):
        raise RuntimeError("this interpret backend cannot record memory accesses (no record_accesses)")
    with _interpret.record_accesses(sample_blocks=sample_blocks) as traces:
        fn()
    return list(traces)


def _host_array(rng, shape, dtype, scale=1.0, complex_=False):
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: F401  (numpy's bfloat16)

        dtype = ml_dtypes.bfloat16
    x = rng.standard_normal(shape) * scale
    if complex_:
        x = x + 1j * rng.standard_normal(shape) * scale
        return x.astype(np.complex128 if dtype == "float64" else np.complex64)
    return x.astype(dtype)


@dataclass
class Workload:
    """One op call to profile: its description, the call, its FLOPs and compulsory bytes
    when known."""

    op: str
    description: str
    dtype: str
    run: object  # () -> None
    flops: float | None
    compulsory_bytes: float | None


def example_workload(op: str, index: int, dtype: str, algorithm: str | None, backward: bool, seed: int = 0):
    """An example of the op registry (cuconv._registry OPS[op].examples), host arrays."""
    from ._registry import get_op

    opdef = get_op(op)
    if not 0 <= index < len(opdef.examples):
        raise ValueError(f"{op} has {len(opdef.examples)} examples (0..{len(opdef.examples) - 1}); got {index}")
    ex = opdef.examples[index]
    rng = np.random.default_rng(seed)
    arrays = {n: _host_array(rng, s, dtype, complex_=n in opdef.complex_arrays)
              for n, s in ex.shapes.items() if s is not None}
    params = dict(ex.params)
    if algorithm:
        params["algorithm"] = algorithm
    y = opdef.forward(**arrays, **params)  # once unrecorded: the output's shape and size
    gy = _host_array(rng, y.shape, dtype)

    def run():
        opdef.forward(**arrays, **params)
        if backward:
            opdef.backward(gy, **arrays, **params)

    nbytes = sum(a.nbytes for a in arrays.values()) + y.nbytes
    if backward:
        nbytes += gy.nbytes + sum(a.nbytes for a in arrays.values())
    shapes = ", ".join(f"{n} {tuple(s)}" for n, s in ex.shapes.items() if s is not None)
    return Workload(op, f"example {index}: {shapes} {ex.params}", dtype, run, None, nbytes)


def _bench_package():
    try:  # installed: bench/ ships as cuconv.bench; in a checkout it is the top-level package
        from . import bench
    except ImportError:
        import bench
    return bench


def bench_rows(op: str, dtype: str, backward: bool) -> list:
    """The bench suites' cases for op (a public op or suite name) in dtype, fwd or fwd+bwd."""
    bench = _bench_package()
    suites = bench.suites_named(op)
    if not suites:
        raise ValueError(f"no bench suite covers {op!r}")
    cases = [c for s in suites for c in s.bench_cases((dtype,), False, None)]
    return [c for c in cases if c.pass_ == ("fwd+bwd" if backward else "fwd")]


def bench_workload(op: str, label: str, dtype: str, algorithm: str | None, backward: bool, seed: int = 0):
    """A row of the bench suites (its shapes, FLOPs and compulsory bytes) on host arrays."""
    import inspect

    cases = bench_rows(op, dtype, backward)
    case = next((c for c in cases if c.label == label), None)
    if case is None:
        raise ValueError(f"no bench row {label!r} for {op} {dtype}; the rows are {[c.label for c in cases]}")
    fn = case.cuconv
    if algorithm:
        name = f"cuconv {algorithm}"
        if name not in case.baselines:
            raise ValueError(f"bench row {label!r} does not run algorithm {algorithm!r}; it runs "
                             f"{[n[7:] for n in case.baselines if n.startswith('cuconv ')]}")
        fn = case.baselines[name][1]
    # The suites build their inputs with harness.random_inputs(shapes, ..., scales): the
    # same shapes and scales, on the host.
    captured = inspect.getclosurevars(case.make_inputs).nonlocals
    if "shapes" not in captured:
        raise ValueError(f"bench row {label!r} builds its inputs its own way; profile it through --example")
    rng = np.random.default_rng(seed)
    scales = captured.get("scales") or (1.0,) * len(captured["shapes"])
    inputs = tuple(_host_array(rng, s, dtype, c) for s, c in zip(captured["shapes"], scales))
    return Workload(case.op, f"bench row {label!r} ({case.pass_})", dtype, lambda: fn(*inputs),
                    case.flops, case.bytes_moved or None)


@dataclass
class Report:
    workload: str
    op: str
    dtype: str
    sample_blocks: int | None
    launches: list  # LaunchProfile
    roofline: Roofline


def profile(workload: Workload, sample_blocks: int | None = 8, device: Device = H100) -> Report:
    traces = record(workload.run, sample_blocks)
    launches = [analyze(t, device) for t in traces]
    dram = sum(p.dram_bytes for p in launches)
    compulsory = workload.compulsory_bytes or sum(p.compulsory_bytes for p in launches)
    unit = compute_unit(workload.dtype, any(p.tensor_cores for p in launches))
    return Report(workload.description, workload.op, workload.dtype, sample_blocks, launches,
                  roofline(dram, compulsory, workload.flops, unit))


# --------------------------------------------------------------------------- printing


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.1f} ns"
    return f"{s * 1e6:.2f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def format_report(r: Report, worst: int = 5) -> str:
    sample = "every block" if r.sample_blocks is None else f"at most {r.sample_blocks} blocks per launch"
    out = [f"EMULATED profile of {r.op} {r.dtype}, {r.workload}; {sample} run on the interpret backend",
           ""]
    for i, p in enumerate(r.launches, 1):
        out.append(f"launch {i}: {p.kernel}  grid {p.grid} block {p.block}  "
                   f"({p.sampled_blocks} of {p.grid_blocks} blocks sampled)")
        o = p.occupancy
        regs = "? regs" if p.registers is None else f"{p.registers} regs"
        smem = f"{(p.static_shared_bytes or 0) + p.shared_bytes} B smem"
        out.append(f"  occupancy (model, H100 SXM): {regs}, {smem}, {o.threads_per_block} threads -> "
                   f"{o.blocks_per_sm} blocks/SM, {o.warps_per_sm} warps/SM ({100 * o.occupancy:.0f}%), "
                   f"limited by {o.limiter}; {p.grid_blocks / max(o.blocks_per_sm * H100.sms, 1):.2f} waves")
        if p.occupancy_note:
            out.append(f"    ({p.occupancy_note})")
        out.append(f"  {'':14}{'requests':>10} {'per req':>8} {'ideal':>6} {'lanes':>6} {'requested':>11} {'moved':>11}")
        for name, a, what in (("global load", p.global_load, "sectors"), ("global store", p.global_store, "sectors"),
                              ("shared load", p.shared_load, "wavefr."), ("shared store", p.shared_store, "wavefr.")):
            if a.requests:
                moved = _bytes(a.bytes_moved) if what == "sectors" else "-"
                out.append(f"  {name:<14}{a.requests:>10} {a.per_request:>8.2f} {a.ideal_per_request:>6.2f} "
                           f"{100 * a.active_lanes:>5.0f}% {_bytes(a.bytes_requested):>11} {moved:>11}")
        out.append("  (per req: sectors for global, wavefronts for shared; sampled blocks only)")
        out.append(f"  barriers/block {p.barriers_per_block:.1f}; DRAM (infinite L2, scaled to the grid) "
                   f"{_bytes(p.dram_bytes)} vs compulsory {_bytes(p.compulsory_bytes)} "
                   f"({p.dram_bytes / max(p.compulsory_bytes, 1):.2f}x); without reuse across blocks "
                   f"{_bytes(p.block_footprint_bytes)} ({p.block_footprint_bytes / max(p.compulsory_bytes, 1):.2f}x)")
        bad = [s for s in p.sites if s.excess > 0 or s.active_lanes < 0.99][:worst]
        for s in bad:
            unit = "sectors" if s.space == "global" else "wavefronts"
            out.append(f"    {s.site:<24} {s.space} {s.kind}: {s.per_request:.2f} {unit}/req (ideal "
                       f"{s.ideal_per_request:.2f}), {100 * s.active_lanes:.0f}% lanes, {s.requests} req")
        out.append("")
    rl = r.roofline
    out.append(f"roofline (MODEL; {rl.ceilings}):")
    mem = f"  DRAM {_bytes(rl.dram_bytes)} modelled -> {_time(rl.memory_s)}; compulsory {_bytes(rl.compulsory_bytes)} " \
          f"-> {_time(rl.compulsory_s)}"
    out.append(mem)
    if rl.flops == 0:
        out.append("  no FLOPs (the bench counts this op as pure data movement)")
    elif rl.compute_s is None:
        out.append("  FLOPs unknown for this workload (the bench rows carry them: --bench-row); memory bound only")
    else:
        out.append(f"  {rl.flops / 1e9:.2f} GFLOP on {rl.unit} -> {_time(rl.compute_s)}")
    out.append(f"  time >= {_time(rl.bound_s)} ({rl.bound_by}-bound)")
    return "\n".join(out)


def to_json(r: Report) -> str:
    return json.dumps(asdict(r), indent=1, default=str)


def main(args) -> int:
    """The `cuconv profile` subcommand (arguments parsed by cuconv.cli)."""
    os.environ["CUCONV_BACKEND"] = "interpret"
    backward = args.backward
    try:
        if args.bench_row is not None:
            w = bench_workload(args.op, args.bench_row, args.dtype, args.algorithm, backward)
        else:
            w = example_workload(args.op, args.example, args.dtype, args.algorithm, backward)
        report = profile(w, None if args.blocks == 0 else args.blocks)
    except (ValueError, KeyError, RuntimeError) as e:
        print(f"cuconv profile: {e}")
        return 2
    print(to_json(report) if args.json else format_report(report))
    return 0
