"""Fragment probes: does this device's tensor-core arithmetic follow the fragment layouts
the kernels were written (and tested on the interpret backend) against?

The tensor-core kernels (conv2d's 'implicit_gemm', its depthwise banded-Toeplitz route,
dynamic_conv2d's 'implicit_gemm') are right only if the real mma.sync / ldmatrix /
cvt.rna.tf32 instructions place every element where kernels_cu/common/mma.cuh says, and
the interpret backend can only check the host fallbacks that emulate that layout. The
probes (kernels_cu/probes.cu) run each instruction once on inputs whose exact answer
NumPy computes from the documented layout: small multiples of 1/8 for the mma probes, so
every product and sum is exact in float32 whatever order the hardware adds in, and
distinct bit patterns or rounding ties for the loads. A probe passes only on a bitwise
match.

tensor_cores_verified(call) is what algorithm='auto' asks before it may pick a
tensor-core algorithm for float16/bfloat16 (cuconv/ops/_algorithms.py). On the first
question about a device it runs the probes there (a few microseconds of kernels, plus
one compile that CuPy caches on disk) and keeps the verdict for the rest of the process,
per device (name, compute capability, UUID) and CuPy version. When the probes fail it
warns once (RuntimeWarning naming the device and the failing probes) and 'auto' stays on
the exact CUDA-core kernels there; a named algorithm is never gated. On the interpret
backend the probes run on interpret: they then test the host fallbacks.

The verdict is not stored on disk: the probes cost less than reading a file once
compiled, and a stale "passed" (a new driver, another board in the same slot) is what
they exist to rule out.

CUCONV_TENSOR_CORE_PROBES: 'run' (default) runs them; 'pass' or 'fail' forces the
verdict without running anything (for tests, or to switch tensor cores off for 'auto').

`python -m cuconv._probes [--backend cuda|interpret] [--device N]` prints the report
as JSON and exits 1 when a probe fails.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _cuda, _interpret
from ._kernels import KernelModule

KERNELS = KernelModule(
    "probes.cu",
    kernels=("probe_mma", "probe_fragment_load"),
    params_struct="ProbeParams",
    dtypes=("float16", "bfloat16", "float32"),
)
MODES = ("run", "pass", "fail")
_TILES = 4  # warps per probe (two per block): an even number, several so a warp mix-up shows
_MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 and m16n8k8 .tf32


@dataclass
class ProbeReport:
    passed: bool
    results: dict[str, str]  # probe name -> "ok" or a one-line failure
    device: str
    cupy: str | None

    def failures(self) -> dict[str, str]:
        return {name: result for name, result in self.results.items() if result != "ok"}

    def summary(self) -> str:
        """The failures on one line ('every probe: WHY' when they share one reason)."""
        failures = self.failures()
        reasons = set(failures.values())
        if len(failures) == len(self.results) > 1 and len(reasons) == 1:
            return f"every probe: {reasons.pop()}"
        return "; ".join(f"{name}: {why}" for name, why in failures.items())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the expected answers, from mma.cuh's documented layouts ---

def _bits16(values: np.ndarray, dtype: str) -> np.ndarray:
    """Exactly representable values as their float16 / bfloat16 bits (uint16)."""
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the high half


def _value16(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def tf32(values: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32 as mma.cuh documents it: finite v -> (bits + 0x1000) & ~0x1fff (round
    to nearest, ties away from zero, an overflow to inf); inf and NaN kept."""
    u = np.asarray(values, np.float32).view(np.uint32)
    finite = (u & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    return np.where(finite, (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000), u).astype(np.uint32).view(np.float32)


def _eighths(rng, shape) -> np.ndarray:
    """m / 8 for random integers |m| <= 32: exact in float16, bfloat16 and tf32."""
    return rng.integers(-32, 33, shape) / 8.0


def _mma_inputs(dtype: str, rng) -> list[np.ndarray]:
    """[a, bt, c, d]: A [tiles, 16, K], B stored by column [tiles, 8, K], C [tiles, 16, 8] and
    the poisoned output. Products are multiples of 1/64 of at most 16 and C multiples of 1/64
    of at most 8, so D = A B + C is exact in float32 for any summation order."""
    k = 16 if dtype != "float32" else 8
    a, bt = _eighths(rng, (_TILES, 16, k)), _eighths(rng, (_TILES, 8, k))
    if dtype != "float32":
        a, bt = _bits16(a, dtype), _bits16(bt, dtype)
    else:
        a, bt = a.astype(np.float32), bt.astype(np.float32)
    c = (rng.integers(-512, 513, (_TILES, 16, 8)) / 64.0).astype(np.float32)
    return [a, bt, c, np.full((_TILES, 16, 8), np.nan, np.float32)]


def _mma_expected(dtype: str, inputs: list[np.ndarray]) -> np.ndarray:
    a, bt, c, _ = inputs
    if dtype != "float32":
        a, bt = _value16(a, dtype), _value16(bt, dtype)
    else:
        a, bt = tf32(a).astype(np.float64), tf32(bt).astype(np.float64)
    return (np.matmul(a, bt.transpose(0, 2, 1)) + c).astype(np.float32)


def _tf32_cases(rng) -> np.ndarray:
    """float32 values on, just below and just above tf32 rounding ties (both signs, even and
    odd tf32 neighbours, where ties-to-even and ties-away differ), subnormals, the largest
    finite value (rounds to inf), inf and NaN, then random values up to [tiles, 32, 8]."""
    base = rng.integers(0x3E000000, 0x41000000, 40, dtype=np.uint32) & np.uint32(0xFFFFC000)  # even tf32 value
    ties = [base | np.uint32(0x1000), base | np.uint32(0x0FFF), base | np.uint32(0x1001),
            base | np.uint32(0x3000),  # tie above an odd tf32 neighbour
            np.array([0x00001000, 0x00003000, 0x00000FFF, 0x7F7FFFFF, 0x7F7FF000, 0, 0x7F800000, 0x7FC00001],
                     np.uint32)]
    positive = np.concatenate(ties)
    special = np.concatenate([positive, positive | np.uint32(0x80000000)]).view(np.float32)
    size = _TILES * 32 * 8
    return np.concatenate([special, rng.standard_normal(size - special.size).astype(np.float32)]).reshape(
        _TILES, 32, 8)


def _load_inputs(dtype: str, rng) -> list[np.ndarray]:
    """[src, out]: for 16-bit types distinct bit patterns (so any misplaced element shows),
    for float32 the tf32 rounding cases; out poisoned."""
    shape = (_TILES, 32, 8)
    if dtype == "float32":
        return [_tf32_cases(rng), np.full(shape, np.nan, np.float32)]
    src = rng.permutation(1 << 16)[: _TILES * 256].astype(np.uint16).reshape(shape)
    return [src, np.full(shape, 0xFFFF, np.uint16)]


def _load_expected(dtype: str, inputs: list[np.ndarray]) -> np.ndarray:
    src = inputs[0]
    if dtype == "float32":
        return tf32(src)
    # ldmatrix.x4: lane l's register i is word l % 4 of the row that lane 8i + l // 4 addressed,
    # and lane j of warp w addresses row (5j + 3 + w) % 32 (probes.cu)
    expected = np.empty_like(src)
    for w in range(src.shape[0]):
        for lane in range(32):
            for i in range(4):
                row = (5 * (8 * i + lane // 4) + 3 + w) % 32
                expected[w, lane, 2 * i:2 * i + 2] = src[w, row, 2 * (lane % 4):2 * (lane % 4) + 2]
    return expected


def _compare(got: np.ndarray, expected: np.ndarray, where: str) -> str:
    """'ok' when the bits match (NaN matching any NaN), else how many differ and the first."""
    if got.dtype.kind == "f":
        same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    else:
        same = got == expected
    if same.all():
        return "ok"
    index = tuple(int(i) for i in np.argwhere(~same)[0])
    show = (lambda v: repr(float(v))) if got.dtype.kind == "f" else (lambda v: f"bits {int(v):#06x}")
    return (f"{int((~same).sum())} of {same.size} elements differ; first at {where} {index}: "
            f"got {show(got[index])}, expected {show(expected[index])}")


@dataclass(frozen=True)
class Probe:
    kernel: str
    dtype: str
    inputs: Callable    # (dtype, rng) -> the kernel's arrays, the output last
    expected: Callable  # (dtype, inputs) -> what the output must be
    where: str          # how an output index reads, for the failure message


PROBES: dict[str, Probe] = {
    "mma_m16n8k16_f16": Probe("probe_mma", "float16", _mma_inputs, _mma_expected, "(tile, row, col)"),
    "mma_m16n8k16_bf16": Probe("probe_mma", "bfloat16", _mma_inputs, _mma_expected, "(tile, row, col)"),
    "mma_m16n8k8_tf32": Probe("probe_mma", "float32", _mma_inputs, _mma_expected, "(tile, row, col)"),
    "ldmatrix_x4_f16": Probe("probe_fragment_load", "float16", _load_inputs, _load_expected, "(tile, lane, element)"),
    "ldmatrix_x4_bf16": Probe("probe_fragment_load", "bfloat16", _load_inputs, _load_expected,
                              "(tile, lane, element)"),
    "cvt_rna_tf32": Probe("probe_fragment_load", "float32", _load_inputs, _load_expected, "(tile, lane, element)"),
}


# --- running them ---

def launch(backend: str, device_id: int, kernel: str, dtype: str, arrays: list[np.ndarray]) -> np.ndarray:
    """One probe kernel over _TILES warps on host `arrays`; returns the output (the last array)."""
    grid, block = (_TILES // 2, 1, 1), (64, 1, 1)
    params = KERNELS.params(tiles=_TILES)
    if backend == "interpret":
        _interpret.launch(KERNELS, kernel, dtype, grid, block, 0, params, arrays)
        return arrays[-1]
    import cupy

    with cupy.cuda.Device(device_id):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            on_device = [cupy.asarray(a) for a in arrays]  # 16-bit values travel as uint16 bits
            _cuda.launch(KERNELS, kernel, dtype, grid, block, 0, params, on_device, device_id, stream)
            out = cupy.asnumpy(on_device[-1], stream=stream)
        stream.synchronize()
    return out


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _run(probe: Probe, backend: str, device_id: int) -> str:
    try:
        inputs = probe.inputs(probe.dtype, np.random.default_rng(0))
        got = launch(backend, device_id, probe.kernel, probe.dtype, [a.copy() for a in inputs])
        return _compare(got, probe.expected(probe.dtype, inputs), probe.where)
    except Exception as error:  # a probe that cannot run (compile error, no device) fails, with its reason
        return _one_line(error)


@functools.cache
def _cupy_version() -> str | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy.__version__


@functools.cache
def _device(backend: str, device_id: int) -> tuple[str, tuple[int, int] | None]:
    """(a description naming the device: name, compute capability, index, UUID where CuPy
    gives one; its compute capability), read once per process."""
    if backend == "interpret":
        return "interpret (the host fallbacks of kernels_cu/common/mma.cuh)", None
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    uuid = props.get("uuid")
    uuid = f", uuid {bytes(uuid).hex()}" if uuid else ""
    return f"{name} (sm_{props['major']}{props['minor']}, device {device_id}{uuid})", (props["major"], props["minor"])


def run_probes(device_id: int = 0, backend: str = "cuda") -> ProbeReport:
    """Runs every probe on `backend` ('cuda': GPU `device_id`; 'interpret': the host
    fallbacks) and reports each one: 'ok' or why not. Never raises for a failing probe."""
    if backend not in ("cuda", "interpret"):
        raise ValueError(f"run_probes: backend must be 'cuda' or 'interpret', got {backend!r}")
    try:
        device, capability = _device(backend, device_id)
    except Exception as error:  # no CuPy, no such device
        results = {name: _one_line(error) for name in PROBES}
        return ProbeReport(False, results, f"cuda device {device_id}", _cupy_version())
    if capability is not None and capability < _MIN_CAPABILITY:
        reason = (f"not run: the tensor-core kernels need compute capability {_MIN_CAPABILITY[0]}."
                  f"{_MIN_CAPABILITY[1]}, this device has {capability[0]}.{capability[1]}")
        return ProbeReport(False, {name: reason for name in PROBES}, device, _cupy_version())
    results = {name: _run(probe, backend, device_id) for name, probe in PROBES.items()}
    return ProbeReport(all(r == "ok" for r in results.values()), results, device, _cupy_version())


# --- the verdict 'auto' consults ---

def mode() -> str:
    """CUCONV_TENSOR_CORE_PROBES: 'run' (default), 'pass' or 'fail'."""
    value = os.environ.get("CUCONV_TENSOR_CORE_PROBES", "").strip().lower() or "run"
    if value not in MODES:
        raise ValueError(f"CUCONV_TENSOR_CORE_PROBES must be one of {MODES}, got {value!r}")
    return value


_reports: dict[tuple, ProbeReport] = {}
_lock = threading.Lock()


def report(backend: str, device_id: int = 0) -> ProbeReport:
    """The verdict for a device under the current mode: made (and, when it fails, warned
    about) once per process and device, then cached."""
    forced = mode()
    try:
        device = _device(backend, device_id)[0]
    except Exception:
        device = f"cuda device {device_id}"
    key = (forced, backend, device, _cupy_version())
    with _lock:
        if key not in _reports:
            if forced == "run":
                made = run_probes(device_id, backend)
            else:
                result = "ok" if forced == "pass" else "forced to fail by CUCONV_TENSOR_CORE_PROBES=fail"
                made = ProbeReport(forced == "pass", {name: result for name in PROBES}, device, _cupy_version())
            _reports[key] = made
            if not made.passed:
                warnings.warn(f"cuconv: tensor-core fragment probes failed on {made.device} ({made.summary()}). "
                              f"algorithm='auto' keeps float16/bfloat16 on the exact CUDA-core kernels on this "
                              f"device; naming a tensor-core algorithm (e.g. algorithm='implicit_gemm') still "
                              f"runs it", RuntimeWarning, stacklevel=2)
        return _reports[key]


def tensor_cores_verified(call) -> bool:
    """Whether `call`'s device (call.backend, call.device_id) passed the fragment probes."""
    return report(call.backend, call.device_id).passed


def reports() -> dict[tuple, ProbeReport]:
    """The verdicts made so far in this process, by (mode, backend, device, CuPy version)."""
    return dict(_reports)


def forget() -> None:
    """Drops every cached verdict (the next question runs the probes again)."""
    with _lock:
        _reports.clear()


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m cuconv._probes", description="run the tensor-core fragment "
                                     "probes and print the report as JSON")
    parser.add_argument("--backend", choices=("cuda", "interpret"), default="cuda")
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_probes(args.device, args.backend)
    print(json.dumps(result.as_dict(), indent=1))
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
