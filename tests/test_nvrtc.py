"""Tests for cuconv._nvrtc: GPU-less compilation of CUDA C++ to cubins."""

import textwrap

import pytest

# Only an absent compiler wheel is a reason to skip; anything else must fail.
pytest.importorskip("nvidia.cuda_nvrtc", reason="pip install nvidia-cuda-nvrtc-cu12")

from cuconv import _nvrtc  # noqa: E402
from cuconv._nvrtc import (  # noqa: E402
    KernelResources,
    NvrtcError,
    NvrtcUnavailable,
    compile_to_cubin,
    nvrtc_version,
    parse_ptxas_log,
    runtime_include_dir,
)

TEMPLATED_SRC = textwrap.dedent("""
    #include <cuda_fp16.h>
    #include <cuda_bf16.h>

    template <typename T>
    __global__ void scale_fwd(const T* x, T* y, long long n) {
        long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) {
            float v = static_cast<float>(x[i]);
            y[i] = static_cast<T>(v * 2.0f + 1.0f);
        }
    }
""")

TYPES = ["__half", "__nv_bfloat16", "float", "double"]


def test_version_and_headers():
    major, minor = nvrtc_version()
    assert major >= 12 and minor >= 0
    assert runtime_include_dir().endswith("include")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_templated_kernel_all_dtypes(arch):
    exprs = [f"scale_fwd<{t}>" for t in TYPES]
    res = compile_to_cubin(TEMPLATED_SRC, exprs, arch=arch)

    assert res.arch == arch
    assert res.cubin.startswith(b"\x7fELF")
    assert set(res.lowered_names) == set(exprs)
    mangled = list(res.lowered_names.values())
    assert all(m.startswith("_Z") for m in mangled)
    assert len(set(mangled)) == len(exprs)
    for expr in exprs:
        r = res.resources[expr]
        assert isinstance(r.registers, int) and r.registers > 0, (expr, r)
        assert r.spill_stores == 0 and r.spill_loads == 0
        assert r.shared_bytes == 0
    assert f"for '{arch}'" in res.log  # the ptxas -v output really is there

    # The ELF reader is the fallback when the log lacks a kernel, so it has to
    # agree with ptxas wherever both are available.
    elf_regs = _nvrtc._cubin_register_counts(res.cubin)
    for expr, m in res.lowered_names.items():
        assert elf_regs[m] == res.resources[expr].registers


def test_static_shared_memory_is_reported():
    src = textwrap.dedent("""
        template <typename T>
        __global__ void tile_rev(const T* x, T* y) {
            __shared__ float tile[256];
            tile[threadIdx.x] = static_cast<float>(x[blockIdx.x * 256 + threadIdx.x]);
            __syncthreads();
            y[blockIdx.x * 256 + threadIdx.x] = static_cast<T>(tile[255 - threadIdx.x]);
        }
    """)
    res = compile_to_cubin(src, ["tile_rev<float>"], arch="sm_90")
    r = res.resources["tile_rev<float>"]
    assert r.shared_bytes is not None and r.shared_bytes >= 1024
    assert r.registers > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_stack_frame_kernel_and_noinline_helper(arch):
    # A dynamically indexed local array lives on the stack, and the noinline
    # helper gets its own "Function properties" block in the ptxas log that
    # must not overwrite the kernel's numbers.
    src = textwrap.dedent("""
        __device__ __noinline__ float pick(const float* p, int i) {
            float a[64];
            for (int k = 0; k < 64; ++k) a[k] = p[k * i];
            return a[i & 63];
        }
        template <typename T>
        __global__ void gather(T* y) { y[threadIdx.x] = pick(y, threadIdx.x); }
        __global__ void tiny(float* y) { y[threadIdx.x] *= 2.0f; }
    """)
    res = compile_to_cubin(src, ["gather<float>", "tiny"], arch=arch)
    gather, tiny = res.resources["gather<float>"], res.resources["tiny"]
    assert gather.registers > tiny.registers > 0
    assert "bytes stack frame" in res.log
    elf_regs = _nvrtc._cubin_register_counts(res.cubin)
    assert elf_regs[res.lowered_names["gather<float>"]] == gather.registers
    assert elf_regs[res.lowered_names["tiny"]] == tiny.registers


def test_syntax_error_raises_with_log():
    src = "__global__ void broken(float* y) {\n    y[0] = 1.0f\n}\n"
    with pytest.raises(NvrtcError) as info:
        compile_to_cubin(src, ["broken"], program_name="broken.cu")
    err = info.value
    assert "error" in err.log
    assert "broken.cu(3)" in err.log or "broken.cu(2)" in err.log, err.log
    assert err.log in str(err)


def test_include_dirs_are_honoured(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "foo.cuh").write_text(
        "#pragma once\n__device__ inline float foo_twice(float v) { return 2.0f * v; }\n")
    src = '#include "common/foo.cuh"\n__global__ void use_foo(float* y) { y[threadIdx.x] = foo_twice(y[threadIdx.x]); }\n'

    with pytest.raises(NvrtcError, match="foo.cuh"):
        compile_to_cubin(src, ["use_foo"])
    res = compile_to_cubin(src, ["use_foo"], include_dirs=[str(tmp_path)])
    assert res.lowered_names["use_foo"] == "_Z7use_fooPf"
    assert res.resources["use_foo"].registers > 0


def test_extra_options_are_passed():
    src = "__global__ void k(float* y) {\n#ifdef CUCONV_FLAG\n y[0] = CUCONV_FLAG;\n#endif\n}\n"
    res = compile_to_cubin(src, ["k"], options=["-DCUCONV_FLAG=3.0f"])
    assert res.cubin.startswith(b"\x7fELF")
    with pytest.raises(NvrtcError):
        compile_to_cubin(src, ["k"], options=["-DCUCONV_FLAG=)"])


def test_virtual_arch_rejected():
    with pytest.raises(ValueError):
        compile_to_cubin("__global__ void k() {}", ["k"], arch="compute_90")


def test_parse_ptxas_log_tolerates_formats():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_Z1av' for 'sm_70'
        ptxas info    : Function properties for _Z1av
            16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 64 registers, 2048 bytes smem, 352 bytes cmem[0]
        ptxas info    : Function properties for _Z6helperv
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'
        ptxas info    : Function properties for _Z1bv
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 8 registers, used 0 barriers
    """)
    parsed = parse_ptxas_log(log)
    assert parsed["_Z1av"] == KernelResources(64, 8, 12, 2048)
    assert parsed["_Z1bv"] == KernelResources(8, 0, 0, 0)
    assert parsed["_Z6helperv"].registers is None  # device function, not a kernel


def test_elf_fallback_fills_registers_when_log_lacks_kernel(monkeypatch):
    exprs = [f"scale_fwd<{t}>" for t in TYPES]
    with_log = compile_to_cubin(TEMPLATED_SRC, exprs, arch="sm_90")
    # Simulate an NVRTC whose log carries no ptxas -v lines.
    monkeypatch.setattr(_nvrtc, "parse_ptxas_log", lambda log: {})
    without_log = compile_to_cubin(TEMPLATED_SRC, exprs, arch="sm_90")
    for expr in exprs:
        r = without_log.resources[expr]
        assert r.registers == with_log.resources[expr].registers
        assert r.spill_stores is None and r.shared_bytes is None


def test_bad_library_path_raises_unavailable(monkeypatch):
    monkeypatch.setenv("CUCONV_NVRTC_LIB", "/nonexistent/libnvrtc.so.12")
    _nvrtc._lib.cache_clear()
    try:
        with pytest.raises(NvrtcUnavailable, match="nvidia-cuda-nvrtc-cu12"):
            nvrtc_version()
    finally:
        monkeypatch.delenv("CUCONV_NVRTC_LIB")
        _nvrtc._lib.cache_clear()
    assert nvrtc_version()[0] >= 12
