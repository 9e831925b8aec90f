"""Autotuning: which algorithm an op's `algorithm='auto'` runs, per (op, pass, shape,
dtype, device).

Off by default. Then 'auto' takes the first algorithm of the op's fixed fallback
order (the op supplies it), so a call's result never depends on timing noise or on
what another process tuned.

CUCONV_AUTOTUNE=1 turns it on for the cuda backend. The first call with a new key runs
every supported candidate once (warm-up, and the result kept for the guard below),
then times each over `CUCONV_AUTOTUNE_REPEATS` runs (default 5, median, CUDA events on
the call's stream) and keeps the fastest. The choice is recorded with every
candidate's time in a JSON file: CUCONV_AUTOTUNE_CACHE, default
~/.cache/cuconv/autotune.json. Later calls and later processes read it and time
nothing. Keys hold the device name and a digest of every kernel source, so a new GPU
or an edited kernel is tuned afresh. The interpret backend never tunes, because CPU
emulation times say nothing about a GPU.

The guard: a candidate whose result differs grossly from the fallback choice's result
is dropped and never chosen. Grossly means a relative max-norm difference above
max(64 units of roundoff, 1e-3), or non-finite values where the fallback's are finite.
This is a sanity check against a kernel that is fast but wrong on this device (e.g.
a tensor-core fragment layout the emulator got wrong). The precision contract itself
is the test suite's job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import _arrays
from ._kernels import kernels_dir

_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def tuning_enabled(call) -> bool:
    """Whether `call` ('s backend) tunes: CUCONV_AUTOTUNE=1 and the cuda backend."""
    return os.environ.get("CUCONV_AUTOTUNE", "").strip() == "1" and call.backend == "cuda"


def cache_path() -> Path:
    configured = os.environ.get("CUCONV_AUTOTUNE_CACHE", "").strip()
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cuconv" / "autotune.json"


@functools.cache
def kernels_digest() -> str:
    """A digest of every kernel source and header: part of every key."""
    h = hashlib.sha256()
    root = kernels_dir()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".cu", ".cuh")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def device_name(call) -> str:
    if call.backend == "interpret":
        return "interpret"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(call.device_id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name} sm_{props['major']}{props['minor']}"


def make_key(call, op: str, stage: str, geometry: dict) -> str:
    parts = dict(op=op, stage=stage, dtype=call.dtype, device=device_name(call), kernels=kernels_digest(),
                 geometry=geometry)
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


# In-process view of the cache file (None until first read).
_memory: dict | None = None


def _load() -> dict:
    global _memory
    if _memory is None:
        _memory = _read_file()
    return _memory


def _read_file() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: tune afresh
    return data if isinstance(data, dict) else {}


def _record(key: str, entry: dict) -> None:
    """Adds an entry and rewrites the file atomically, merged with what other processes
    wrote meanwhile."""
    memory = _load()
    memory[key] = entry
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_file(), **memory}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break the op
        warnings.warn(f"cuconv autotune: could not write {path}: {exc}", RuntimeWarning, stacklevel=3)


def forget() -> None:
    """Drops the in-process view (the next lookup rereads the file)."""
    global _memory
    _memory = None


def lookup(key: str) -> str | None:
    entry = _load().get(key)
    return entry.get("choice") if isinstance(entry, dict) else None


def measure(call, algorithm: str, run: Callable[[], object]) -> float:
    """Median seconds of `run` on the call's stream (CUDA events). The tests replace this."""
    import cupy

    repeats = max(1, int(os.environ.get("CUCONV_AUTOTUNE_REPEATS", "5")))
    stream = call.stream()
    times = []
    with call.on_device():  # events belong to the current device, and must be the stream's
        for _ in range(repeats):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            run()
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(times)


def _host(result) -> list[np.ndarray | None]:
    """A result (an exported array or a tuple of them) as float64 NumPy arrays."""
    items = result if isinstance(result, tuple) else (result,)
    out = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        a = _arrays.to_host(_arrays.import_array("autotune", "result", item))
        out.append(np.asarray(a.data, dtype=np.float64))
    return out


def agrees(candidate, baseline, dtype: str) -> bool:
    """The guard: candidate's arrays within max(64 u, 1e-3) of the baseline's, relative
    to the baseline's largest magnitude, and finite wherever the baseline is."""
    bound = max(64 * _UNIT_ROUNDOFF[dtype], 1e-3)
    for c, b in zip(_host(candidate), _host(baseline)):
        if (c is None) != (b is None):
            return False
        if c is None or b.size == 0:
            continue
        finite = np.isfinite(b)
        if not np.isfinite(c[finite]).all():
            return False
        scale = np.abs(b[finite]).max(initial=0.0)
        if np.abs(c[finite] - b[finite]).max(initial=0.0) > bound * max(scale, np.finfo(np.float64).tiny):
            return False
    return True


def choose(call, key: str, candidates: Sequence[str], run: Callable[[str], object]) -> str:
    """The algorithm to run: candidates[0] (the fallback order's choice) unless tuning is
    on; then the cached or newly measured fastest candidate that passes the guard."""
    if not candidates:
        raise ValueError("autotune: no candidate algorithm")
    if len(candidates) == 1 or not tuning_enabled(call):
        return candidates[0]
    cached = lookup(key)
    if cached in candidates:
        return cached
    baseline = run(candidates[0])
    times, rejected = {}, []
    for algorithm in candidates:
        if algorithm != candidates[0] and not agrees(run(algorithm), baseline, call.dtype):
            rejected.append(algorithm)
            warnings.warn(f"cuconv autotune: {algorithm} disagrees with {candidates[0]} on {key}; "
                          f"not choosing it", RuntimeWarning, stacklevel=3)
            continue
        times[algorithm] = measure(call, algorithm, lambda a=algorithm: run(a))
    choice = min(times, key=lambda a: (times[a], candidates.index(a)))
    _record(key, dict(choice=choice, seconds=times, rejected=rejected))
    return choice
