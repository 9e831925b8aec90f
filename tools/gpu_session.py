"""The GPU session's driver: one device call runs five stages in order, each in a process
group of its own under its own time box, and carries on past any stage that fails or
overruns. tools/gpu_session.sh is the entry point: it names the test files, and its
header has the time boxes and how to resume.

Everything lands in OUT, as at most 8 files (what the device tool brings back):
  summary.json   each stage's status, seconds, box, key figures and files; rewritten as
                 every stage starts and ends, so a run killed midway still says how far
                 it got and which stages to run next ("resume")
  session.log    every stage's output, one section per stage
  tests.xml      junit of the cuda tests      sanitize.xml  junit of the memcheck run
  memcheck.log   compute-sanitizer's report   bench.json    python -m bench --quick
Anything else found there is packed into extras.tar.gz.

`python3 tools/gpu_session.py --body compile|probes|pytest-no-pools ...` runs one stage's
body; the driver starts those itself.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()

# Seconds per stage, in running order (tools/gpu_session.sh's header states the same and
# a test holds them equal). The device gives one command 10 minutes and a task 15
# minutes in all, machine start included: the whole call must end inside 8.
BOXES = {"compile": 90, "probes": 30, "tests": 140, "sanitize": 90, "bench": 80}
# The whole run's deadline: a stage's box is cut to what is left of it, and a stage is
# not started when that leaves it under MIN_BOX_S.
BUDGET_S = 450
MIN_BOX_S = 5
# A stage past its box gets SIGINT first, then this long before SIGKILL: on SIGINT pytest
# still writes its junit file (with xdist workers that takes a few seconds) and
# compute-sanitizer its error summary.
KILL_GRACE_S = 8

# The cuda parametrizations (ids like test_x[cuda-float32]); some interpret tests carry
# 'cuda' in their names (test_cuda_backend_matches_reference[interpret]).
SELECT = "cuda and not interpret"
# One GPU, so the gain from workers is on the CPU side: the float64 references and the
# torch CPU oracles dominate a cuda test. Eight processes with two threads each fill the
# 16 cores without oversubscribing them; eight CUDA contexts (~0.5 GiB each, with JAX's
# preallocation off) are nothing to 139 GiB, and time-sliced kernels stay correct.
TEST_WORKERS = 8
TEST_THREADS = "2"

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
LOG = "session.log"
SUMMARY = "summary.json"
EXTRAS = "extras.tar.gz"
KNOWN_FILES = (SUMMARY, LOG, "tests.xml", "sanitize.xml", "memcheck.log", "bench.json", EXTRAS)

FIGURES_ENV = "GPU_SESSION_FIGURES"  # where a body stage writes its figures (JSON)
DRY_RUN_ENV = "CUCONV_GPU_SESSION_DRY_RUN"  # print each stage's command instead of running it


@dataclass
class Stage:
    name: str
    box_s: float
    command: list[str]
    env: dict = field(default_factory=dict)
    files: tuple = ()  # what the stage writes under OUT
    # (OUT, the stage's log section, the body's figures) -> figures, "headline" included
    figures: Callable[[Path, str, dict], dict] | None = None


# SIGTERM or SIGINT to the driver (the shell script's guard ran out): the running stage
# is ended and recorded, and no further stage starts.
_stop = {"signal": None}
POLL_S = 0.2


def _on_signal(signum, frame):
    _stop["signal"] = signal.Signals(signum).name


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- stage selection and resume ----------------------------------------------------

def select_stages(stages: str | None = None, start: str | None = None) -> list[str]:
    """The stages to run, in running order: `stages` a comma-separated list, or `start`
    and every stage after it, or all of them."""
    names = list(BOXES)
    if stages and start:
        raise ValueError("give the stages to run or the stage to start from, not both")
    if start:
        if start not in names:
            raise ValueError(f"no stage {start!r}; the stages are {','.join(names)}")
        return names[names.index(start):]
    if not stages:
        return names
    chosen = {s.strip() for s in stages.split(",") if s.strip()}
    unknown = sorted(chosen - set(names))
    if unknown or not chosen:
        raise ValueError(f"no stage {unknown}; the stages are {','.join(names)}")
    return [n for n in names if n in chosen]


NOT_COMPLETED = ("timeout", "not_reached", "pending", "running")


def resume_hint(summary: dict) -> str | None:
    """The call that runs what did not complete: those stages, after compile (a fresh
    machine's kernel cache is empty, and compile fills it all modules at once), with
    the budget the boxes leave spread over the stages that ran out of time."""
    todo = [n for n in summary["selected"] if summary["stages"][n]["status"] in NOT_COMPLETED]
    if not todo:
        return None
    if todo[0] != "compile" and "compile" in summary["stages"]:
        todo = ["compile", *todo]
    boxes = {n: summary["stages"][n]["box_s"] for n in todo}
    timed_out = [n for n in todo if summary["stages"][n]["status"] == "timeout"]
    spare = summary["budget_s"] - sum(boxes.values())
    extra = ""
    if timed_out and spare >= len(timed_out):
        extra = "".join(f" --box {n}={int(boxes[n] + spare // len(timed_out))}" for n in timed_out)
    return f"STAGES={','.join(todo)} bash tools/gpu_session.sh{extra}"


# --- figures -------------------------------------------------------------------------

OUTCOME = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
XDIST_LINE = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({OUTCOME}) (.+?)\s*$")
PLAIN_LINE = re.compile(rf"^(tests/.+?::.+?) ({OUTCOME})(?:\s+\[\s*\d+%\])?\s*$")


def pytest_figures(junit: Path, log: str) -> dict:
    """Counts and failing ids from the junit file, or from pytest -v's lines when the run
    was killed before writing it."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    if junit.is_file():
        try:
            for case in ET.parse(junit).getroot().iter("testcase"):
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                key = {"failure": "failed", "error": "errors"}.get(kind, kind)
                counts[key] += 1
                if key in ("failed", "errors"):
                    failing.append(f"{case.get('classname')}::{case.get('name')}")
            return {**counts, "failing": failing, "source": junit.name}
        except ET.ParseError:
            pass
    outcomes = {}
    for line in log.splitlines():
        m = XDIST_LINE.match(line)
        if m:
            outcomes[m.group(2)] = m.group(1)
        elif m := PLAIN_LINE.match(line):
            outcomes[m.group(1)] = m.group(2)
    for test, outcome in outcomes.items():
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failing.append(test)
    return {**counts, "failing": failing, "source": "log (no junit: the run did not finish)"}


def _pytest_headline(f: dict) -> str:
    return f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"


def compile_figures(out: Path, log: str, body: dict) -> dict:
    if not body:
        return {"headline": "no figures: the stage did not get to its module list"}
    done, failed = body.get("modules", {}), body.get("failed", {})
    total = body.get("total", "?")
    headline = f"{len(done)} of {total} modules compiled"
    if done:
        slowest = max(done, key=done.get)
        headline += f", slowest {slowest} {done[slowest]:.1f} s"
    if failed:
        headline += f"; failed: {', '.join(failed)}"
    return {**body, "headline": headline}


def probes_figures(out: Path, log: str, body: dict) -> dict:
    if "error" in body:
        return {**body, "headline": body["error"][:300]}
    if "passed" not in body:
        return {**body, "headline": "no verdict: the probes did not finish"}
    results = body.get("results", {})
    bad = [p for p, verdict in results.items() if verdict != "ok"]
    verdict = "passed" if body.get("passed") else "FAILED"
    headline = f"{verdict}: {len(results) - len(bad)} of {len(results)} probes ok"
    return {**body, "headline": headline + (f"; failing: {', '.join(bad)}" if bad else "")}


def tests_figures(out: Path, log: str, body: dict) -> dict:
    f = pytest_figures(out / "tests.xml", log)
    return {**f, "headline": _pytest_headline(f)}


def sanitize_figures(out: Path, log: str, body: dict) -> dict:
    f = pytest_figures(out / "sanitize.xml", log)
    report = out / "memcheck.log"
    text = report.read_text(errors="replace") if report.is_file() else ""
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    first_lines = [line for line in text.splitlines() if re.match(r"^========= (Invalid|Misaligned|Out of)", line)]
    kinds = sorted({line.removeprefix("=========").strip().split(" of size")[0] for line in first_lines})
    errors = int(m.group(1)) if m else None
    memcheck = f"memcheck {errors} errors" if m else "memcheck: no ERROR SUMMARY (killed, or it did not start)"
    return {**f, "memcheck_errors": errors, "memcheck_kinds": kinds[:10],
            "headline": f"{memcheck}; {_pytest_headline(f)}"}


def bench_figures(out: Path, log: str, body: dict) -> dict:
    path = out / "bench.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        m = re.findall(r"self-check: (\d+) passed, (\d+) failed", log)
        check = f"self-check {m[-1][0]} passed, {m[-1][1]} failed" if m else "no self-check line"
        return {"headline": f"no bench.json; {check}"}
    check = result.get("self_check", {})
    ceilings = result.get("ceilings", {})
    return {"device": result.get("device"), "rows": len(result.get("rows", [])), "self_check": check,
            "ceilings": ceilings,
            "headline": f"{result.get('device')}: {len(result.get('rows', []))} rows; self-check "
                        f"{check.get('passed')} passed, {check.get('failed')} failed; copy "
                        f"{ceilings.get('copy_gbs', 0):.0f} GB/s, GEMM {ceilings.get('gemm_tflops', 0):.0f} TFLOP/s"}


# --- the stages ------------------------------------------------------------------------

def _sanitizer() -> str:
    found = shutil.which("compute-sanitizer") or sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))
    return found if isinstance(found, str) else (found[-1] if found else "compute-sanitizer")


def build_stages(out: Path, sanitize_tests: list[str], skip_tests: list[str]) -> list[Stage]:
    py = sys.executable
    # -v: a run killed before its junit file still leaves one line per test in the log;
    # no:benchmark: pytest-benchmark only warns, once per xdist worker, that it is off
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:benchmark", "-v", "-rfE", "-k", SELECT]
    workers = ["-n", str(TEST_WORKERS), "--dist", "loadfile"] if importlib.util.find_spec("xdist") else []
    if sanitize_tests:
        # memcheck checks each access against its allocation: the pools must be off, or an
        # overrun inside a pooled block goes unseen. One process (no xdist) for one report.
        sanitize = [_sanitizer(), "--tool", "memcheck", "--error-exitcode", "9", "--report-api-errors", "no",
                    "--print-limit", "200", "--log-file", str(out / "memcheck.log"),
                    py, str(SELF), "--body", "pytest-no-pools", "-p", "no:xdist", *pytest[3:],
                    f"--junitxml={out / 'sanitize.xml'}", *sanitize_tests]
    else:  # without files pytest would run the whole suite under the sanitizer
        sanitize = [py, "-c", "raise SystemExit('no test files named for the sanitizer stage (--sanitize-tests)')"]
    return [
        Stage("compile", BOXES["compile"], [py, str(SELF), "--body", "compile"], figures=compile_figures),
        Stage("probes", BOXES["probes"], [py, str(SELF), "--body", "probes"], figures=probes_figures),
        Stage("tests", BOXES["tests"],
              [*pytest, *workers, "--durations=15", f"--junitxml={out / 'tests.xml'}",
               *(f"--ignore={t}" for t in skip_tests)],
              env={"OMP_NUM_THREADS": TEST_THREADS, "MKL_NUM_THREADS": TEST_THREADS},
              files=("tests.xml",), figures=tests_figures),
        Stage("sanitize", BOXES["sanitize"], sanitize,
              env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"},
              files=("memcheck.log", "sanitize.xml"), figures=sanitize_figures),
        Stage("bench", BOXES["bench"], [py, "-m", "bench", "--quick", "--json", str(out / "bench.json")],
              files=("bench.json",), figures=bench_figures),
    ]


# --- running ---------------------------------------------------------------------------

def _new_group() -> dict:
    # A process group, not a session: the device tool ends a call's leftover processes
    # unless they started a session of their own.
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGINT to the stage's whole group (pytest's xdist workers, the compile pool, the
    sanitizer's target), then SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if wait:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def write_summary(out: Path, summary: dict) -> None:
    summary["updated"] = _now()
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(out / SUMMARY)


def run_stage(stage: Stage, out: Path, log, summary: dict, deadline: float, workdir: Path) -> None:
    record = summary["stages"][stage.name]
    box = min(stage.box_s, deadline - time.monotonic())
    if box < min(stage.box_s, MIN_BOX_S):
        record.update(status="not_reached", note=f"under {MIN_BOX_S} s left of the {summary['budget_s']} s budget")
        write_summary(out, summary)
        return
    command = stage.command
    if os.environ.get(DRY_RUN_ENV):
        command = [sys.executable, "-c", "import sys; print('dry run:', *sys.argv[1:])", *command]
    figures_file = workdir / f"{stage.name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1",
           # every stage may load JAX next to CuPy and torch: it must not take 75% of the GPU
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           FIGURES_ENV: str(figures_file), **stage.env}
    record.update(status="running", started=_now(), command=shlex.join(stage.command))
    if box < stage.box_s:
        record["box_cut_to_s"] = round(box, 1)
    write_summary(out, summary)
    log.write(f"\n===== {stage.name} (box {box:.0f} s): {shlex.join(command)}\n")
    log.flush()
    section = log.tell()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, **_new_group())
    except OSError as e:
        record.update(status="failed", rc=None, note=f"could not start: {e}")
    else:
        end = start + box
        while proc.poll() is None and not _stop["signal"] and time.monotonic() < end:
            time.sleep(POLL_S)
        rc = proc.poll()
        if rc is not None:
            record.update(status="ok" if rc == 0 else "failed", rc=rc)
        elif _stop["signal"]:
            record.update(status="timeout", rc=None, note=f"the session was stopped ({_stop['signal']})")
        else:
            record.update(status="timeout", rc=None, note=f"killed after its {box:.0f} s box")
        _kill_group(proc)  # also any stragglers a finished stage left in its group
    record["seconds"] = round(time.monotonic() - start, 1)
    log.flush()
    with open(out / LOG, errors="replace") as f:
        f.seek(section)
        text = f.read()
    log.write(f"\n===== {stage.name}: {record['status']} in {record['seconds']} s\n")
    log.flush()
    record["log_tail"] = text.splitlines()[-15:] if record["status"] != "ok" else []
    try:
        body = json.loads(figures_file.read_text()) if figures_file.is_file() else {}
    except ValueError:
        body = {}
    try:
        record["figures"] = stage.figures(out, text, body) if stage.figures else body
    except Exception as e:  # a figure that cannot be read must not cost the other stages
        record["figures"] = {"headline": f"figures unreadable: {type(e).__name__}: {e}"}
    record["files"] = [LOG, *(f for f in stage.files if (out / f).is_file())]
    write_summary(out, summary)


def _cap(path: Path) -> None:
    """A file over the device tool's size limit keeps its head and its tail."""
    size = path.stat().st_size
    if size <= MAX_FILE_BYTES:
        return
    keep = MAX_FILE_BYTES // 2 - 4096
    with open(path, "rb") as f:
        head = f.read(keep)
        f.seek(size - keep)
        tail = f.read()
    path.write_bytes(head + f"\n[... {size - 2 * keep} bytes cut ...]\n".encode() + tail)


def pack(out: Path) -> list[str]:
    """At most MAX_FILES files under OUT, none deeper than two folders, none over the size
    limit: what is not one of the session's own files goes into extras.tar.gz."""
    files = sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())
    extras = [p for p in files if p.relative_to(out).as_posix() not in KNOWN_FILES or p.is_symlink()]
    if extras and (len(files) > MAX_FILES or any(len(p.relative_to(out).parts) > 3 for p in extras)):
        with tarfile.open(out / EXTRAS, "w:gz") as tar:
            for p in extras:
                tar.add(p, arcname=p.relative_to(out).as_posix())
        for p in extras:
            p.unlink()
        for d in sorted((d for d in out.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            if not any(d.iterdir()):
                d.rmdir()
    for p in out.iterdir():
        if p.is_file():
            _cap(p)
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _device() -> dict:
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=20)
        return {"nvidia_smi": (result.stdout or result.stderr).strip()}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia_smi": f"unavailable: {e}"}


def render(summary: dict, out: Path) -> str:
    """The compact summary for stdout (the device tool returns its last 12,000 characters):
    the failing tests and the tail of each stage that did not pass, then the table."""
    lines = []
    for name in summary["selected"]:
        r = summary["stages"][name]
        failing = r.get("figures", {}).get("failing") or []
        if failing:
            lines.append(f"--- {name}: failing tests ({len(failing)}; first 20)")
            lines += [f"  {t}" for t in failing[:20]]
        if r.get("log_tail"):
            lines.append(f"--- {name}: end of its log")
            lines += [f"  {line[:200]}" for line in r["log_tail"]]
    total = summary.get("seconds", 0)
    lines.append(f"=== GPU session: {total:.0f} s of a {summary['budget_s']} s budget; "
                 f"{summary['device'].get('nvidia_smi', '')}")
    for name, r in summary["stages"].items():
        seconds = f"{r['seconds']:.0f} s" if "seconds" in r else "-"
        headline = "; ".join(filter(None, [r.get("note"), r.get("figures", {}).get("headline")]))
        lines.append(f"{name:<9} {r['status']:<11} {seconds:>6} / {r['box_s']:>3.0f} s  {headline}")
    if summary["failed"]:
        lines.append(f"failed: {', '.join(summary['failed'])}")
    lines.append(f"not completed: {', '.join(summary['not_completed']) or 'none'}")
    if summary["resume"]:
        lines.append(f"resume: {summary['resume']}")
    lines.append(f"files in {out}: {' '.join(summary.get('files', []))}")
    return "\n".join(lines)


def run_session(out: Path, stages: list[Stage], selected: list[str], budget_s: float = BUDGET_S) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "started": _now(), "budget_s": budget_s, "selected": selected, "device": _device(),
        "stages": {s.name: {"status": "pending" if s.name in selected else "skipped", "box_s": s.box_s, "log": LOG}
                   for s in stages},
    }
    summary.update(failed=[], not_completed=list(selected), resume=resume_hint(summary))
    write_summary(out, summary)
    start = time.monotonic()
    deadline = start + budget_s
    workdir = Path(tempfile.mkdtemp(prefix="gpu-session-"))
    _stop["signal"] = None
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # where Python allows handlers
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with open(out / LOG, "a") as log:
            for stage in stages:
                if stage.name in selected and not _stop["signal"]:  # once stopped, the rest stay 'pending'
                    run_stage(stage, out, log, summary, deadline, workdir)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)
        summary.update(finished=_now(), seconds=round(time.monotonic() - start, 1),
                       failed=[n for n in selected if summary["stages"][n]["status"] == "failed"],
                       not_completed=[n for n in selected if summary["stages"][n]["status"] in NOT_COMPLETED])
        summary["resume"] = resume_hint(summary)
        write_summary(out, summary)
        summary["files"] = pack(out)
        write_summary(out, summary)
        text = render(summary, out)
        with open(out / LOG, "a") as log:
            log.write("\n" + text + "\n")
        print(text, flush=True)
    return summary


# --- stage bodies (run by the driver in their own processes) --------------------------------

def _write_figures(figures: dict) -> None:
    path = os.environ.get(FIGURES_ENV)
    if path:
        Path(path).write_text(json.dumps(figures, default=str))


def _compile_one(filename: str):
    """One module as the cuda backend builds it (_cuda._module: its code, options and name
    expressions), so the entry this fills in CuPy's on-disk cache, keyed by those, is the
    one the later stages read."""
    try:
        import cupy

        from cuconv import _cuda
        from cuconv.check import all_modules

        module = next(m for m in all_modules() if m.filename == filename)
        start = time.perf_counter()
        with cupy.cuda.Device(0):
            cupy.RawModule(code=module.source(), options=_cuda._options(),
                           name_expressions=module.name_expressions).compile()
        return time.perf_counter() - start, None
    except Exception as e:  # returned, not raised: a CuPy exception need not pickle
        return None, f"{type(e).__name__}: {e}"


def body_compile() -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from cuconv.check import all_modules

    # The longest compile first, so it is not the last to start.
    modules = sorted(all_modules(), key=lambda m: len(m.source()) * len(m.name_expressions), reverse=True)
    figures = {"total": len(modules), "modules": {}, "failed": {}}
    try:
        import cupy

        figures.update(cupy=cupy.__version__, nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    except Exception as e:
        figures["cupy"] = f"{type(e).__name__}: {e}"
    _write_figures(figures)
    # spawn: each worker makes its own CUDA context; a forked one would inherit a broken one
    pool = ProcessPoolExecutor(max_workers=min(len(modules), os.cpu_count() or 1),
                               mp_context=multiprocessing.get_context("spawn"))
    with pool:
        futures = {pool.submit(_compile_one, m.filename): m.filename for m in modules}
        for future in as_completed(futures):
            name = futures[future]
            seconds, error = future.result()
            if error:
                figures["failed"][name] = error[:2000]
                print(f"compile {name}: FAILED\n{error}", flush=True)
            else:
                figures["modules"][name] = round(seconds, 1)
                print(f"compile {name}: {seconds:.1f} s", flush=True)
            _write_figures(figures)
    return 1 if figures["failed"] else 0


def body_probes() -> int:
    try:
        from cuconv._probes import run_probes
    except ImportError as e:
        _write_figures({"error": f"ImportError: {e}"})
        print(f"probes: ImportError: {e}", flush=True)
        return 1
    report = run_probes(device_id=0, backend="cuda")
    figures = dict(report.as_dict())
    figures.setdefault("passed", bool(report.passed))
    figures.setdefault("results", dict(report.results))
    _write_figures(figures)
    for probe, verdict in report.results.items():
        print(f"probe {probe}: {verdict}", flush=True)
    return 0 if report.passed else 1


def body_pytest_no_pools(args: list[str]) -> int:
    """pytest with CuPy's device and pinned pools off (every array its own cudaMalloc);
    torch's and JAX's are off through the environment the driver sets."""
    import cupy

    cupy.cuda.set_allocator(None)
    cupy.cuda.set_pinned_memory_allocator(None)
    import pytest

    return int(pytest.main(args))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--body"]:
        body = argv[1]
        if body == "compile":
            return body_compile()
        if body == "probes":
            return body_probes()
        if body == "pytest-no-pools":
            return body_pytest_no_pools(argv[2:])
        raise SystemExit(f"no body {body!r}")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", help="where everything goes (default $OUT)")
    p.add_argument("--stages", default=os.environ.get("STAGES"),
                   help=f"comma-separated stages to run (default $STAGES, else all: {','.join(BOXES)})")
    p.add_argument("--from", dest="start", help="run this stage and every one after it")
    p.add_argument("--box", action="append", default=[], metavar="STAGE=SECONDS", help="another time box for a stage")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"the whole run's seconds (default {BUDGET_S})")
    p.add_argument("--sanitize-tests", default="", help="test files for the memcheck stage (space-separated)")
    p.add_argument("--skip-tests", default="", help="test files the tests stage leaves out (space-separated)")
    args = p.parse_args(argv)
    try:
        selected = select_stages(args.stages, args.start)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out).resolve()
    stages = build_stages(out, args.sanitize_tests.split(), args.skip_tests.split())
    for item in args.box:
        name, _, seconds = item.partition("=")
        stage = next((s for s in stages if s.name == name), None)
        if stage is None or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--box {item}: want STAGE=SECONDS, STAGE one of {','.join(BOXES)}")
        stage.box_s = float(seconds)
    summary = run_session(out, stages, selected, args.budget)
    return 0 if all(summary["stages"][n]["status"] == "ok" for n in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
