"""tools/gpu_session.py, the GPU session's driver, run here with stand-in stage commands:
the summary it writes, its time boxes, stage selection for a resumed call, and the
device tool's limit on the files that come back."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_session.sh"
from tools import gpu_session as gs  # noqa: E402  (the repo root is on sys.path: conftest)

PY = sys.executable


def stage(name, code, box=5.0, **kw):
    return gs.Stage(name, box, [PY, "-c", code], **kw)


def files_under(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_overrun_is_killed_with_its_children_and_the_next_stage_runs(tmp_path):
    out = tmp_path / "out"
    pid_file = tmp_path / "child.pid"
    # The overrunning stage starts a child of its own: the box must end both.
    sleeper = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
               f"time.sleep(60)")
    stages = [stage("a", "print('hello from a')"),
              stage("b", sleeper, box=1.5),
              stage("c", "import sys; print('c fails'); sys.exit(3)"),
              stage("d", "print('d runs')", figures=lambda out, log, body: {"headline": "d's figures", "log": log})]
    start = time.monotonic()
    summary = gs.run_session(out, stages, ["a", "b", "c", "d"], budget_s=60)
    assert time.monotonic() - start < 15
    st = summary["stages"]
    assert [st[n]["status"] for n in "abcd"] == ["ok", "timeout", "failed", "ok"]
    assert st["b"]["seconds"] < 1.5 + gs.KILL_GRACE_S + 2 and "box" in st["b"]["note"]
    assert st["c"]["rc"] == 3 and "c fails" in "\n".join(st["c"]["log_tail"])
    assert st["d"]["figures"]["headline"] == "d's figures" and "d runs" in st["d"]["figures"]["log"]
    assert "hello from a" not in st["d"]["figures"]["log"]  # each stage sees its own log section
    assert summary["failed"] == ["c"] and summary["not_completed"] == ["b"]
    assert summary["resume"].startswith("STAGES=b bash tools/gpu_session.sh")
    # what is on disk is what was returned, and the log has every stage's output
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["stages"] == json.loads(json.dumps(summary["stages"]))
    log = (out / "session.log").read_text()
    assert "hello from a" in log and "started" in log and "d runs" in log and "not completed: b" in log
    child = int(pid_file.read_text())
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text(), "the overrun stage's child outlived its box"


def test_unselected_stages_are_skipped_and_the_budget_stops_the_rest(tmp_path):
    stages = [stage("a", "import time; time.sleep(0.3)"), stage("b", "pass"),
              stage("c", "pass", box=30), stage("d", "pass")]
    # a budget that a's run leaves too little of: c and d are not started
    summary = gs.run_session(tmp_path, stages, ["a", "c", "d"], budget_s=gs.MIN_BOX_S + 0.2)
    st = summary["stages"]
    assert [st[n]["status"] for n in "abcd"] == ["ok", "skipped", "not_reached", "not_reached"]
    assert summary["not_completed"] == ["c", "d"]
    assert summary["resume"] == "STAGES=c,d bash tools/gpu_session.sh"


def test_select_stages():
    assert gs.select_stages() == list(gs.BOXES)
    assert gs.select_stages(start="tests") == ["tests", "sanitize", "bench"]
    assert gs.select_stages("bench, compile") == ["compile", "bench"]  # always in running order
    for bad in (dict(stages="tests,nope"), dict(start="nope"), dict(stages="tests", start="bench")):
        with pytest.raises(ValueError):
            gs.select_stages(**bad)


def test_resume_hint_gives_the_spare_budget_to_the_stage_that_ran_out():
    statuses = {"compile": "ok", "probes": "ok", "tests": "timeout", "sanitize": "pending", "bench": "pending"}
    summary = {"selected": list(statuses), "budget_s": gs.BUDGET_S,
               "stages": {n: {"status": s, "box_s": gs.BOXES[n]} for n, s in statuses.items()}}
    spare = gs.BUDGET_S - sum(gs.BOXES[n] for n in ("compile", "tests", "sanitize", "bench"))
    assert gs.resume_hint(summary) == (f"STAGES=compile,tests,sanitize,bench bash tools/gpu_session.sh "
                                       f"--box tests={gs.BOXES['tests'] + spare}")
    summary["stages"]["tests"]["status"] = summary["stages"]["sanitize"]["status"] = "failed"
    summary["stages"]["bench"]["status"] = "ok"
    assert gs.resume_hint(summary) is None  # a failure wants a fix, not a rerun


def test_pack_keeps_at_most_eight_files_two_folders_deep(tmp_path):
    for name in ("summary.json", "session.log", "tests.xml", "bench.json"):
        (tmp_path / name).write_text(name)
    for i in range(10):
        (tmp_path / f"extra{i}.txt").write_text(str(i))
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep")
    files = gs.pack(tmp_path)
    assert files == files_under(tmp_path) and len(files) <= gs.MAX_FILES
    assert set(files) == {"summary.json", "session.log", "tests.xml", "bench.json", "extras.tar.gz"}
    with tarfile.open(tmp_path / "extras.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(["a/b/c/deep.txt", *(f"extra{i}.txt" for i in range(10))])
    assert not (tmp_path / "a").exists()


def test_pack_cuts_a_file_over_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "MAX_FILE_BYTES", 64 * 1024)
    log = tmp_path / "session.log"
    log.write_bytes(b"head\n" + b"x" * 200_000 + b"\ntail\n")
    gs.pack(tmp_path)
    text = log.read_bytes()
    assert len(text) <= 64 * 1024 and text.startswith(b"head\n") and text.endswith(b"\ntail\n")


def test_pytest_figures_from_junit_and_from_a_killed_run(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="t[cuda-1]"/>'
                     '<testcase classname="tests.test_a" name="t[cuda-2]"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="u[cuda]"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    f = gs.pytest_figures(junit, "")
    assert (f["passed"], f["failed"], f["skipped"], f["failing"]) == (1, 1, 1, ["tests.test_a::t[cuda-2]"])
    log = ("[gw0] [ 10%] PASSED tests/test_a.py::t[cuda-1] \n"
           "[gw1] [ 20%] FAILED tests/test_a.py::t[cuda-2 with spaces] \n"
           "tests/test_b.py::u[cuda] SKIPPED (no GPU)                    [ 30%]\n"
           "tests/test_b.py::v[cuda] PASSED                              [ 40%]\n")
    f = gs.pytest_figures(tmp_path / "absent.xml", log)
    assert (f["passed"], f["failed"], f["failing"]) == (2, 1, ["tests/test_a.py::t[cuda-2 with spaces]"])


def test_sanitize_figures_read_the_memcheck_report(tmp_path):
    (tmp_path / "memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
        "=========     at conv2d_fwd<float>+0x70\n========= ERROR SUMMARY: 1 error\n")
    f = gs.sanitize_figures(tmp_path, "", {})
    assert f["memcheck_errors"] == 1 and f["memcheck_kinds"] == ["Invalid __global__ read"]


def test_header_states_the_boxes_and_they_fit_eight_minutes():
    header = SCRIPT.read_text().split("\nset -u", 1)[0]
    stated = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#\s+(\w+)\s+(\d+) s ", header, re.M)}
    assert stated == {**gs.BOXES, "total": sum(gs.BOXES.values())}
    guard = re.search(r"timeout --kill-after=(\d+) (\d+) ", SCRIPT.read_text())
    assert sum(gs.BOXES.values()) < gs.BUDGET_S and gs.BUDGET_S + gs.KILL_GRACE_S < int(guard.group(2))
    assert int(guard.group(2)) + int(guard.group(1)) <= 8 * 60
    assert f"budget is {gs.BUDGET_S} s" in header


def test_the_script_runs_every_stage_dry(tmp_path):
    """The shell entry point end to end, each stage's command printed instead of run."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), CUCONV_GPU_SESSION_DRY_RUN="1", STAGES="compile,tests,sanitize,bench")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["stages"].items()} == {
        "compile": "ok", "probes": "skipped", "tests": "ok", "sanitize": "ok", "bench": "ok"}
    assert summary["resume"] is None and "not completed: none" in proc.stdout
    log = (out / "session.log").read_text()
    tests = next(line for line in log.splitlines() if line.startswith("dry run:") and "--junitxml" in line)
    assert "-k cuda and not interpret" in tests and "--ignore=tests/test_nvrtc.py" in tests
    sanitize = next(line for line in log.splitlines() if "memcheck" in line and line.startswith("dry run:"))
    assert "--error-exitcode 9" in sanitize and "pytest-no-pools" in sanitize
    assert "tests/test_depthwise_tc.py" in sanitize
    assert f"--log-file {out}/memcheck.log" in sanitize
    assert len(files_under(out)) <= gs.MAX_FILES


def test_a_stopped_session_records_the_running_stage_and_starts_no_other(tmp_path):
    """SIGTERM (the shell script's guard) ends the running stage's group and leaves a
    summary that names what did not complete."""
    out = tmp_path / "out"
    runner = tmp_path / "runner.py"
    runner.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tools import gpu_session as gs\n"
        "py = sys.executable\n"
        "stages = [gs.Stage('a', 30, [py, '-c', 'import time; print(\"sleeping\", flush=True); time.sleep(60)']),\n"
        "          gs.Stage('b', 30, [py, '-c', 'pass'])]\n"
        f"gs.run_session(gs.Path({str(out)!r}), stages, ['a', 'b'], budget_s=60)\n")
    proc = subprocess.Popen([PY, str(runner)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "session.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "sleeping" in log.read_text()):  # until stage a is running
        assert proc.poll() is None and time.monotonic() < deadline, f"stage a never started: {proc.communicate()}"
        time.sleep(0.05)
    proc.terminate()
    stdout, _ = proc.communicate(timeout=15)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["a"]["status"] == "timeout" and "SIGTERM" in summary["stages"]["a"]["note"]
    assert summary["stages"]["b"]["status"] == "pending"
    assert summary["not_completed"] == ["a", "b"] and "resume: STAGES=a,b" in stdout
