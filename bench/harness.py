"""Machinery every benchmark suite shares: dtypes and error measures for the
self-check, GPU detection, CUDA-event timing over input sets rotated past the L2
cache, the copy / GEMM ceilings, and the Markdown / JSON output.

A suite (bench/<op>.py) provides
    NAME                                   the op family, e.g. "conv2d"
    self_check(dtypes, backends, rng, torch_module)  ->  list[CheckRow]
    bench_cases(dtypes, quick, torch_module)         ->  list[BenchCase]
(torch_module: torch when it sees the GPU, else None: then CuPy arrays, no baselines);
bench/__init__.py finds it by these names (SUITES).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
GPU_DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
HOST_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}

# --- self-check: errors and tolerances ---

# Fixed tolerances on max|got - ref| / max|ref| against the float64 reference.
FIXED_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
# float16 / bfloat16: 2x the error of the same computation done by torch CPU in that
# dtype (the anchor), but never below one unit in the last place at 1.0 (2**-10 and
# 2**-7: twice the unit roundoff, so a correctly rounded result always fits).
ANCHOR_FACTOR = 2.0
TOLERANCE_FLOOR = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
# Where torch CPU lacks the op in that dtype: a documented bound instead.
FALLBACK_TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1}


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref|, both taken to float64; inf when `got` holds a NaN or
    Inf or the shapes differ (so such a result always fails)."""
    got, ref = to_float64(got), np.asarray(ref, np.float64)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return math.inf
    if ref.size == 0:
        return 0.0
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def tolerance(dtype: str, anchor_error: float | None) -> tuple[float, str]:
    """(tolerance, where it comes from) for a result in `dtype`. `anchor_error` is the
    rel_error of torch CPU doing the same computation in `dtype` (None if it cannot)."""
    if dtype in FIXED_TOLERANCE:
        return FIXED_TOLERANCE[dtype], "fixed"
    if anchor_error is None or not math.isfinite(anchor_error):
        return FALLBACK_TOLERANCE[dtype], "bound"
    if ANCHOR_FACTOR * anchor_error < TOLERANCE_FLOOR[dtype]:
        return TOLERANCE_FLOOR[dtype], "floor"
    return ANCHOR_FACTOR * anchor_error, "2x torch"


def within(err: float, tol: float) -> bool:
    return math.isfinite(err) and err <= tol


@dataclass
class CheckRow:
    op: str
    pass_: str  # fwd, bwd input, bwd weight, bwd bias
    dtype: str
    config: str
    backend: str
    error: float
    tol: float
    tol_source: str

    @property
    def ok(self) -> bool:
        return within(self.error, self.tol)


def to_float64(a) -> np.ndarray:
    """Any array cuconv returns (NumPy incl. bfloat16, torch CPU/CUDA, CuPy) as float64 NumPy."""
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().double().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        a = a.get()
    return np.asarray(a).astype(np.float64)


def print_check_table(rows: list[CheckRow]) -> None:
    header = (f"{'op':<22} {'pass':<11} {'dtype':<9} {'backend':<9} {'config':<28} {'rel err':>9} {'tol':>9} "
              f"{'(from)':<9} result")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:<22} {r.pass_:<11} {r.dtype:<9} {r.backend:<9} {r.config:<28} {r.error:9.2e} {r.tol:9.2e} "
              f"{r.tol_source:<9} {'PASS' if r.ok else 'FAIL'}")


def print_check_summary(rows: list[CheckRow]) -> None:
    """One line per (op, dtype): rows, the worst error relative to its tolerance, failures."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype), []).append(r)
    header = f"{'op':<28} {'dtype':<9} {'rows':>5} {'worst err':>10} {'its tol':>9} {'err/tol':>8} result"
    print(header)
    print("-" * len(header))
    for (op, dtype), group in groups.items():
        worst = max(group, key=lambda r: (not r.ok, _error_ratio(r)))
        failed = sum(not r.ok for r in group)
        print(f"{op:<28} {dtype:<9} {len(group):>5} {worst.error:10.2e} {worst.tol:9.2e} {_error_ratio(worst):8.2f} "
              f"{'PASS' if not failed else f'FAIL ({failed})'}")


def _error_ratio(r: CheckRow) -> float:
    return r.error / r.tol if r.tol > 0 else (0.0 if r.error == 0 else math.inf)


# --- the self-check loop every suite shares ---

@dataclass(frozen=True)
class OpCheck:
    """What the self-check needs to know about one op."""

    name: str
    forward: Callable  # the cuconv op: fn(*arrays, **params)
    backward: Callable  # its _backward: fn(grad_output, *arrays, **params) -> one gradient per array
    reference: Callable  # float64 reference of forward and backward, same signatures
    reference_backward: Callable
    torch_forward: Callable | None  # fn(torch.nn.functional, *tensors, **params): the fp16/bf16 anchor
    gradient_names: tuple[str, ...]  # one per array argument, e.g. ("input", "weight", "bias")
    exact: bool = False  # rounds nothing (a permutation): must equal the reference bit for bit


def self_check_op(spec: OpCheck, configs, dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    """One CheckRow per (config, dtype, backend, pass). `configs` are (label, array shapes
    with None for an absent optional array, params). Inputs are drawn in `dtype` and the
    reference sees exactly those values."""
    passes = ("fwd",) + tuple(f"bwd {n}" for n in spec.gradient_names)
    rows = []
    for label, shapes, params in configs:
        for dtype in dtypes:
            arrays = [None if s is None else rng.standard_normal(s).astype(HOST_DTYPES[dtype]) for s in shapes]
            y_ref = spec.reference(*arrays, **params)
            gy = rng.standard_normal(y_ref.shape).astype(HOST_DTYPES[dtype])
            refs = (y_ref, *spec.reference_backward(gy, *arrays, **params))
            anchor = _torch_errors(spec, dtype, arrays, gy, params, refs, passes) \
                if dtype in TOLERANCE_FLOOR and not spec.exact else {}
            for backend in backends:
                converted = [None if a is None else to_backend(a, dtype, backend, torch_module) for a in (*arrays, gy)]
                *args, gy_backend = converted
                got = (spec.forward(*args, **params), *spec.backward(gy_backend, *args, **params))
                for pass_, result, ref in zip(passes, got, refs):
                    if ref is not None:
                        tol, source = (0.0, "exact") if spec.exact else tolerance(dtype, anchor.get(pass_))
                        rows.append(CheckRow(spec.name, pass_, dtype, label, backend, rel_error(result, ref), tol,
                                             source))
    return rows


def _torch_errors(spec: OpCheck, dtype, arrays, gy, params, refs, passes) -> dict:
    """rel_error per pass of torch CPU computing the same thing in `dtype` (autograd for
    the gradients); {} when torch is missing or lacks the op in that dtype."""
    try:
        import torch
        import torch.nn.functional as F

        tensors = [None if a is None else
                   torch.from_numpy(a.astype(np.float64)).to(getattr(torch, dtype)).requires_grad_() for a in arrays]
        with warnings.catch_warnings():  # e.g. torch's note that 'same' with an even kernel copies the input
            warnings.simplefilter("ignore", UserWarning)
            y = spec.torch_forward(F, *tensors, **params)
        grads = iter(torch.autograd.grad(y, [t for t in tensors if t is not None],
                                         torch.from_numpy(gy.astype(np.float64)).to(y.dtype)))
        results = [y] + [None if t is None else next(grads) for t in tensors]
    except (ImportError, RuntimeError, NotImplementedError):
        return {}
    return {p: rel_error(got, ref) for p, got, ref in zip(passes, results, refs) if ref is not None}


# --- environment for a stretch of calls ---

@contextlib.contextmanager
def cuconv_env(backend: str, poison: bool):
    """Forces cuconv's backend (CUCONV_BACKEND) and output poisoning (CUCONV_POISON: outputs
    start as NaN, so an element a kernel never writes fails the check) for a block."""
    saved = {k: os.environ.get(k) for k in ("CUCONV_BACKEND", "CUCONV_POISON")}
    os.environ["CUCONV_BACKEND"] = backend
    if poison:
        os.environ["CUCONV_POISON"] = "1"
    else:
        os.environ.pop("CUCONV_POISON", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def to_backend(host, dtype: str, backend: str, torch_module=None):
    """A host array (already in `dtype`) where `backend` runs: itself for interpret; a torch
    CUDA tensor for cuda (a CuPy array when torch is missing)."""
    if backend == "interpret":
        return host
    if torch_module is not None:
        t = torch_module.from_numpy(np.ascontiguousarray(host.astype(np.float64)))
        return t.to(device="cuda", dtype=getattr(torch_module, dtype))
    import cupy

    return cupy.asarray(host)  # CuPy >= 14.2 keeps ml_dtypes.bfloat16


# --- GPU detection ---

def cuda_gpu_usable() -> bool:
    """cupy importable and at least one CUDA device visible."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return False


def torch_cuda():
    """The torch module when it is importable and sees the GPU, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# --- timing (GPU only) ---

class Events:
    """CUDA events from torch when available, else from CuPy; both time the current stream."""

    def __init__(self, torch_module=None):
        self.torch = torch_module

    def pair(self):
        if self.torch is not None:
            return self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        import cupy

        return cupy.cuda.Event(), cupy.cuda.Event()

    def elapsed_ms(self, start, end) -> float:
        if self.torch is not None:
            return start.elapsed_time(end)
        import cupy

        return cupy.cuda.get_elapsed_time(start, end)

    def synchronize(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize()
        else:
            import cupy

            cupy.cuda.get_current_stream().synchronize()


def time_ms(events: Events, fn: Callable, input_sets: list, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn(*input_set), each run bracketed by CUDA events, the input
    sets taken in turn so that (when there are enough of them) no run finds its inputs in L2."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    events.synchronize()
    marks = []
    for i in range(repeats):
        start, end = events.pair()
        start.record()
        fn(*input_sets[(warmup + i) % len(input_sets)])
        end.record()
        marks.append((start, end))
    events.synchronize()
    return statistics.median(events.elapsed_ms(s, e) for s, e in marks)


def input_set_count(set_bytes: int, l2_bytes: int, limit: int = 256) -> int:
    """How many input sets to rotate so that together they are at least twice the L2 size."""
    return max(2, min(limit, math.ceil(2 * l2_bytes / max(1, set_bytes)) + 1))


def l2_cache_bytes(torch_module) -> int:
    """The device's L2 size, or 50 MB where it cannot be read."""
    if torch_module is not None:
        size = getattr(torch_module.cuda.get_device_properties(0), "L2_cache_size", 0)
        if size:
            return int(size)
    else:
        try:
            import cupy

            size = cupy.cuda.runtime.getDeviceProperties(0).get("l2CacheSize", 0)
            if size:
                return int(size)
        except Exception:
            pass
    return 50 * 10**6


@dataclass
class Ceilings:
    copy_gbs: float  # device-to-device copy, read + write bytes counted
    gemm_tflops: float
    gemm_label: str


def measure_ceilings(events: Events, quick: bool) -> Ceilings:
    """A 1 GiB device-to-device copy and an 8192^3 GEMM (bf16 through torch; fp16 through
    CuPy when torch is missing, since CuPy has no bfloat16), timed like any case."""
    repeats = 5 if quick else 20
    n, nbytes = 8192, 1 << 30
    if events.torch is not None:
        torch = events.torch
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = time_ms(events, lambda: dst.copy_(src), [()], 2, repeats)
        del src, dst
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        gemm_ms = time_ms(events, lambda: torch.matmul(a, b), [()], 2, repeats)
        label = "bf16 GEMM 8192^3 (torch.matmul)"
    else:
        import cupy

        src = cupy.empty(nbytes, dtype=cupy.uint8)
        dst = cupy.empty_like(src)
        copy_ms = time_ms(events, lambda: cupy.copyto(dst, src), [()], 2, repeats)
        del src, dst
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cupy.float16)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cupy.float16)
        gemm_ms = time_ms(events, lambda: cupy.matmul(a, b), [()], 2, repeats)
        label = "fp16 GEMM 8192^3 (cupy.matmul; torch missing, CuPy has no bf16)"
    return Ceilings(copy_gbs=2 * nbytes / copy_ms / 1e6, gemm_tflops=2 * n**3 / gemm_ms / 1e9, gemm_label=label)


@dataclass
class BenchCase:
    """One timed row: cuconv and its baselines on the same inputs."""

    op: str
    label: str  # shape label
    dtype: str
    pass_: str  # fwd, fwd+bwd
    flops: float  # 0 for data movement ops
    make_inputs: Callable[[], tuple]  # one fresh input set
    cuconv: Callable  # fn(*input_set)
    # name -> (prepare(input_set) -> input_set, fn(*prepared_set)); e.g. to channels_last
    baselines: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)
    bytes_moved: float = 0.0  # compulsory bytes read + written; rated against the copy ceiling


# The passes most suites time: the forward alone, and the forward with every gradient.
FWD_BWD = ("fwd", "fwd+bwd")


def timed_dtypes(dtypes, torch_module) -> list[str]:
    """The dtypes a suite times: all of them, less bfloat16 without torch (CuPy arrays then,
    and CuPy has no bfloat16)."""
    return [d for d in dtypes if torch_module is not None or d != "bfloat16"]


def timed_layers(layers, quick: bool, quick_labels) -> list:
    """The layers (tuples, label first) a suite times: every one, or with --quick those
    whose label is in quick_labels."""
    return [layer for layer in layers if not quick or layer[0] in quick_labels]


def random_inputs(shapes, dtype: str, requires_grad: bool, scales, torch=None) -> Callable[[], tuple]:
    """make_inputs for a BenchCase: one fresh set of standard-normal GPU arrays (times
    `scales`), torch CUDA tensors when torch sees the GPU, else CuPy arrays."""
    def make():
        if torch is not None:
            return tuple((torch.randn(s, device="cuda", dtype=getattr(torch, dtype)) * c).requires_grad_(requires_grad)
                         for s, c in zip(shapes, scales))
        import cupy

        return tuple((cupy.random.standard_normal(s, dtype=cupy.float32) * c).astype(dtype)
                     for s, c in zip(shapes, scales))

    return make


def torch_baselines(torch, run_torch: Callable) -> dict:
    """The same torch function on NCHW inputs and on channels_last copies of them."""
    if torch is None:
        return {}

    def channels_last(input_set):
        return tuple(t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
                     for t in input_set)

    return {"torch": (lambda s: s, run_torch), "torch CL": (channels_last, run_torch)}


def tensor_core_rows(dtype: str, run_by_algorithm: Callable[[str], Callable]) -> dict:
    """Baseline rows 'cuconv <algorithm>' for the tensor-core pass algorithms that take
    this dtype (implicit_gemm for float16/bfloat16, implicit_gemm_tf32 for float32), timed
    in the same run as the op's default ('auto')."""
    names = {"float16": ("implicit_gemm",), "bfloat16": ("implicit_gemm",), "float32": ("implicit_gemm_tf32",)}
    return {f"cuconv {a}": (lambda s: s, run_by_algorithm(a)) for a in names.get(dtype, ())}


def set_bytes(input_set: tuple) -> int:
    return sum(int(a.nbytes) if hasattr(a, "nbytes") else a.numel() * a.element_size() for a in input_set)


def peak_extra_mib(torch, fn: Callable, input_set: tuple) -> float | None:
    """MiB that one call of fn allocates at its peak beyond what was allocated before it
    (outputs and workspaces), by torch's allocator; None without torch (CuPy arrays)."""
    if torch is None:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*input_set)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(case: BenchCase, events: Events, l2_bytes: int, warmup: int, repeats: int, ceilings: Ceilings) -> dict:
    first = case.make_inputs()
    sets = [first] + [case.make_inputs() for _ in range(input_set_count(set_bytes(first), l2_bytes) - 1)]
    row = {"op": case.op, "shape": case.label, "dtype": case.dtype, "pass": case.pass_, "input_sets": len(sets),
           "cuconv_ms": time_ms(events, case.cuconv, sets, warmup, repeats),
           "cuconv_peak_mib": peak_extra_mib(events.torch, case.cuconv, first), "baselines": {}}
    for name, (prepare, fn) in case.baselines.items():
        prepared = [prepare(s) for s in sets]
        ms = time_ms(events, fn, prepared, warmup, repeats)
        row["baselines"][name] = dict(ms=ms, ratio=ms / row["cuconv_ms"],
                                      peak_mib=peak_extra_mib(events.torch, fn, prepared[0]))
        del prepared
    if case.flops:
        row["tflops"] = case.flops / row["cuconv_ms"] / 1e9
        row["fraction_of_gemm"] = row["tflops"] / ceilings.gemm_tflops
    if case.bytes_moved:
        row["gbs"] = case.bytes_moved / row["cuconv_ms"] / 1e6
        row["fraction_of_copy"] = row["gbs"] / ceilings.copy_gbs
    return row


def markdown_table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["baselines"]))
    head = ["op", "shape", "dtype", "pass", "cuconv ms"]
    for n in names:
        head += [f"{n} ms", f"{n}/cuconv"]
    head += ["TFLOP/s", "of GEMM", "GB/s", "of copy", "peak MiB (cuconv / first baseline)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], r["dtype"], r["pass"], f"{r['cuconv_ms']:.3f}"]
        for n in names:
            b = r["baselines"].get(n)
            cells += [f"{b['ms']:.3f}", f"{b['ratio']:.2f}"] if b else ["-", "-"]
        cells += [f"{r['tflops']:.2f}", f"{100 * r['fraction_of_gemm']:.1f}%"] if "tflops" in r else ["-", "-"]
        cells += [f"{r['gbs']:.0f}", f"{100 * r['fraction_of_copy']:.1f}%"] if "gbs" in r else ["-", "-"]
        first = next(iter(r["baselines"].values()), {})
        cells.append(" / ".join("-" if v is None else f"{v:.0f}" for v in (r.get("cuconv_peak_mib"),
                                                                           first.get("peak_mib"))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tensor_bytes(shapes, dtype: str) -> float:
    """Bytes of the tensors with these shapes: the compulsory traffic of a pass that reads
    or writes each once (the roofline's x axis comes from flops / these bytes)."""
    return float(sum(math.prod(s) for s in shapes) * HOST_DTYPES[dtype].itemsize)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"

