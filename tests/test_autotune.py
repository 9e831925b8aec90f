"""cuconv/_autotune.py: the untuned fallback, the measured choice, the on-disk cache,
the guard against wrong candidates, and conv2d's use of it.

The interpret backend never tunes (CPU times say nothing about a GPU), so these tests
switch tuning on with `tuning_enabled` patched and replace `measure` by fixed times:
the machinery is what is under test, not a clock."""

import json
import warnings

import numpy as np
import pytest

import cuconv
from cuconv import _autotune
from cuconv.ops.conv2d import CONV2D


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Tuning on (for any backend), a private cache file, and fake timings: set
    times[algorithm] = seconds. measured lists what was timed."""
    cache = tmp_path / "autotune.json"
    monkeypatch.setenv("CUCONV_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setattr(_autotune, "tuning_enabled", lambda call: True)
    times, measured = {}, []

    def fake_measure(call, algorithm, run):
        run()
        measured.append(algorithm)
        return times[algorithm]

    monkeypatch.setattr(_autotune, "measure", fake_measure)
    _autotune.forget()
    yield cache, times, measured
    _autotune.forget()


class FakeCall:
    backend = "interpret"
    dtype = "float64"
    device_id = 0


def results(**by_algorithm):
    """A `run` that returns a fixed array per algorithm and records each call."""
    ran = []

    def run(algorithm):
        ran.append(algorithm)
        return by_algorithm[algorithm]
    return run, ran


def test_untuned_takes_the_fallback_order_and_runs_nothing(monkeypatch):
    monkeypatch.setenv("CUCONV_AUTOTUNE", "1")  # ignored on interpret
    assert not _autotune.tuning_enabled(FakeCall())
    run, ran = results(a=np.ones(3), b=np.ones(3))
    assert _autotune.choose(FakeCall(), "k", ["b", "a"], run) == "b"
    assert ran == []


def test_tuned_choice_is_the_fastest_and_is_cached_on_disk(tuning):
    cache, times, measured = tuning
    times.update(slow=3.0, fast=1.0, middle=2.0)
    same = np.arange(4.0)
    run, ran = results(slow=same, fast=same, middle=same)
    assert _autotune.choose(FakeCall(), "key1", ["slow", "fast", "middle"], run) == "fast"
    assert sorted(measured) == ["fast", "middle", "slow"]
    entry = json.loads(cache.read_text())["key1"]
    assert entry["choice"] == "fast" and entry["seconds"]["slow"] == 3.0 and entry["rejected"] == []
    # a second call, and a fresh process (forget), read the choice instead of timing
    measured.clear(), ran.clear()
    assert _autotune.choose(FakeCall(), "key1", ["slow", "fast", "middle"], run) == "fast"
    _autotune.forget()
    assert _autotune.choose(FakeCall(), "key1", ["slow", "fast", "middle"], run) == "fast"
    assert measured == [] and ran == []


def test_ties_go_to_the_fallback_order(tuning):
    _, times, _ = tuning
    times.update(a=1.0, b=1.0)
    run, _ = results(a=np.zeros(2), b=np.zeros(2))
    assert _autotune.choose(FakeCall(), "tie", ["b", "a"], run) == "b"


def test_a_fast_but_wrong_candidate_is_never_chosen(tuning):
    cache, times, _ = tuning
    times.update(reference=2.0, wrong=0.5, nan=0.1, right=1.0)
    good = np.linspace(-1, 1, 50)
    wrong = good.copy()
    wrong[7] += 0.01  # 1% of the largest magnitude: far past the fp64 guard (1e-3)
    nan = good.copy()
    nan[3] = np.nan
    run, _ = results(reference=good, wrong=wrong, nan=nan, right=good * (1 + 1e-6))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        choice = _autotune.choose(FakeCall(), "guard", ["reference", "wrong", "nan", "right"], run)
    assert choice == "right"
    assert sorted(json.loads(cache.read_text())["guard"]["rejected"]) == ["nan", "wrong"]


def test_the_guard_scales_with_the_dtype():
    base = np.linspace(-1, 1, 50).astype(np.float32)
    off = base + np.float32(5e-3)  # 5e-3 of the max: fine for bfloat16 (64 u = 0.25), not for float32
    assert _autotune.agrees(off, base, "bfloat16")
    assert not _autotune.agrees(off, base, "float32")
    assert _autotune.agrees((base, None), (base, None), "float32")
    assert not _autotune.agrees((base, base), (base, None), "float32")


def test_an_unreadable_cache_file_is_retuned(tuning):
    cache, times, measured = tuning
    cache.write_text("{not json")
    times.update(a=2.0, b=1.0)
    run, _ = results(a=np.ones(1), b=np.ones(1))
    assert _autotune.choose(FakeCall(), "k", ["a", "b"], run) == "b"
    assert measured and json.loads(cache.read_text())["k"]["choice"] == "b"


def test_a_cached_choice_that_is_no_longer_a_candidate_is_retuned(tuning):
    cache, times, measured = tuning
    cache.write_text(json.dumps({"k": {"choice": "gone", "seconds": {}, "rejected": []}}))
    times.update(a=1.0, b=2.0)
    run, _ = results(a=np.ones(1), b=np.ones(1))
    assert _autotune.choose(FakeCall(), "k", ["a", "b"], run) == "a"
    assert measured


def test_keys_separate_dtype_device_and_kernel_sources(monkeypatch, tmp_path):
    call32, call64 = FakeCall(), FakeCall()
    call32.dtype = "float32"
    geometry = dict(batch=2, kernel_h=3)
    assert _autotune.make_key(call32, "conv2d", "forward", geometry) != \
        _autotune.make_key(call64, "conv2d", "forward", geometry)
    assert json.loads(_autotune.make_key(call64, "conv2d", "forward", geometry))["device"] == "interpret"
    # the digest follows every .cu / .cuh byte
    (tmp_path / "common").mkdir()
    (tmp_path / "a.cu").write_text("kernel")
    (tmp_path / "common" / "h.cuh").write_text("header")
    monkeypatch.setattr(_autotune, "kernels_dir", lambda: tmp_path)
    before = _autotune.kernels_digest.__wrapped__()
    (tmp_path / "common" / "h.cuh").write_text("header edited")
    assert _autotune.kernels_digest.__wrapped__() != before


def test_conv2d_auto_runs_the_tuned_choice(tuning):
    cache, times, _ = tuning
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 9, 9))
    w = rng.standard_normal((3, 2, 3, 3))
    times.update(direct=2.0, fft=1.0)
    y = cuconv.conv2d(x, w, padding=1)
    np.testing.assert_allclose(y, cuconv.conv2d(x, w, padding=1, algorithm="fft"), rtol=0, atol=0)
    entries = {json.loads(k)["stage"]: v for k, v in json.loads(cache.read_text()).items()}
    assert entries["forward"]["choice"] == "fft"
    times.update(direct=1.0, fft=2.0)  # cached: the new times are not consulted
    np.testing.assert_array_equal(cuconv.conv2d(x, w, padding=1), y)


def test_conv2d_backward_tunes_each_gradient_on_its_own(tuning, monkeypatch):
    cache, _, _ = tuning
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    gy = rng.standard_normal((2, 4, 8, 7))
    monkeypatch.setattr(CONV2D, "candidates", lambda geom, dtype, passes=False, call=None: ["direct", "fft"])
    # measured in order: grad_input's direct, fft, then grad_weight's direct, fft
    sequence = iter([2.0, 1.0, 1.0, 2.0])
    monkeypatch.setattr(_autotune, "measure", lambda call, algorithm, run: (run(), next(sequence))[1])
    gx, gw, gb = cuconv.conv2d_backward(gy, x, w, b, padding=1)
    by_fft = cuconv.conv2d_backward(gy, x, w, b, padding=1, algorithm="fft")
    by_direct = cuconv.conv2d_backward(gy, x, w, b, padding=1, algorithm="direct")
    stages = {json.loads(k)["stage"] for k in json.loads(cache.read_text())}
    assert stages == {"grad_input", "grad_weight"}
    chosen = {json.loads(k)["stage"]: v["choice"] for k, v in json.loads(cache.read_text()).items()}
    assert chosen == {"grad_input": "fft", "grad_weight": "direct"}
    np.testing.assert_array_equal(gx, by_fft[0])
    np.testing.assert_array_equal(gw, by_direct[1])
    np.testing.assert_array_equal(gb, by_direct[2])
    assert cuconv.conv2d_backward(gy, x, w, b, padding=1, wrt="weight")[0] is None


def test_pass_ops_tune_between_direct_and_implicit_gemm(tuning, launches, monkeypatch):
    """conv_transpose2d, subpixel_conv2d and dynamic_conv2d tuned, on a device whose tensor
    cores are verified: the measured-faster candidate, per stage, and never the TF32 variant."""
    monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", "pass")
    cache, times, measured = tuning
    rng = np.random.default_rng(2)
    times.update(direct=2.0, implicit_gemm=1.0)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float16)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float16)
    np.testing.assert_array_equal(cuconv.conv_transpose2d(x, w, stride=2),
                                  cuconv.conv_transpose2d(x, w, stride=2, algorithm="implicit_gemm"))
    ws = rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
    np.testing.assert_array_equal(cuconv.subpixel_conv2d(x, ws, padding=1),
                                  cuconv.subpixel_conv2d(x, ws, padding=1, algorithm="implicit_gemm"))
    wd = rng.standard_normal((3, 6, 4, 3, 3)).astype(np.float16)
    att = rng.random((1, 3)).astype(np.float16)
    gy = rng.standard_normal((1, 6, 5, 5)).astype(np.float16)
    np.testing.assert_array_equal(cuconv.dynamic_conv2d(x, wd, att, padding=1),
                                  cuconv.dynamic_conv2d(x, wd, att, padding=1, algorithm="implicit_gemm"))
    tuned = cuconv.dynamic_conv2d_backward(gy, x, wd, att, padding=1)
    for got, expected in zip(tuned, cuconv.dynamic_conv2d_backward(gy, x, wd, att, padding=1,
                                                                   algorithm="implicit_gemm")):
        np.testing.assert_array_equal(got, expected)
    entries = [json.loads(k) for k in json.loads(cache.read_text())]
    assert sorted((e["op"], e["stage"]) for e in entries) == [
        ("conv_transpose2d", "forward"), ("dynamic_conv2d", "forward"), ("dynamic_conv2d_backward", "grad_input"),
        ("subpixel_conv2d", "forward")]
    assert set(measured) == {"direct", "implicit_gemm"}


@pytest.mark.parametrize("probes,expected", [("pass", ["conv2d_igemm_bwd_input", "conv2d_igemm_fwd"]),
                                              ("fail", ["conv2d_bwd_input", "conv2d_fwd"])])
def test_pass_ops_untuned_auto(launches, monkeypatch, probes, expected):
    """float16 with several channels per group: the implicit GEMM where the tensor cores are
    verified (cuconv/_probes.py), else 'direct'."""
    from cuconv import _probes

    monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", probes)
    _probes.forget()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the forced failure's warning (tests/test_probes.py)
        cuconv.conv_transpose2d(x, rng.standard_normal((4, 2, 3, 3)).astype(np.float16), stride=2)
        cuconv.subpixel_conv2d(x, rng.standard_normal((8, 4, 3, 3)).astype(np.float16), padding=1)
    _probes.forget()
    assert launches == expected
