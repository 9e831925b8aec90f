"""KernelModule: what the host reads from the .cu text itself (the params struct's
fields, named constants, each kernel's parameter count) and the launch-time checks
built on it, under both backends."""

import numpy as np
import pytest

from cuconv import _interpret, ops
from cuconv._kernels import KernelModule


def module(tmp_path, text, params_struct="P", kernels=("k",), header=None):
    if header is not None:
        (tmp_path / "common").mkdir(exist_ok=True)
        (tmp_path / "common" / "h.cuh").write_text("#pragma once\n" + header)
    (tmp_path / "k.cu").write_text(text)
    return KernelModule("k.cu", kernels=kernels, params_struct=params_struct, dtypes=("float32",), directory=tmp_path)


def kernels_of(op_module):
    """The KernelModule of cuconv/ops/<op_module>.py."""
    return getattr(ops, op_module).KERNELS


# --- params struct -------------------------------------------------------------------

def test_param_fields_follow_a_base_struct_in_an_included_header(tmp_path):
    m = module(tmp_path, '#include "common/h.cuh"\n'
                         "struct P : Base {\n  long long c;  // c\n  long long d, e;\n};\n",
               header="struct Base {\n  long long a, b;  // first\n};\n")
    assert m.param_fields == ("a", "b", "c", "d", "e")
    np.testing.assert_array_equal(m.params(e=5, d=4, c=3, b=2, a=1), [1, 2, 3, 4, 5])


def test_param_fields_refuse_a_repeated_field_and_a_missing_base(tmp_path):
    with pytest.raises(ValueError, match="repeats a field"):
        module(tmp_path, "struct B { long long a; };\nstruct P : B { long long a; };\n").param_fields
    with pytest.raises(ValueError, match="struct Nowhere not found"):
        module(tmp_path, "struct P : Nowhere { long long a; };\n").param_fields


def test_conv_params_structs_share_the_geometry_fields():
    geometry = ("batch", "in_channels", "in_h", "in_w", "out_channels", "out_h", "out_w", "kernel_h", "kernel_w",
                "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w")
    for m in map(kernels_of, ("conv2d", "deform_conv", "depthwise", "dynamic_conv")):
        assert m.param_fields[: len(geometry)] == geometry, m.filename
        assert "ConvGeometryParams" in m.source()


# --- constant() ----------------------------------------------------------------------

def test_constant_reads_integer_literals(tmp_path):
    m = module(tmp_path, '#include "common/h.cuh"\n'
                         "constexpr int kA = 128;  // a comment\n"
                         "constexpr int kB = 64, kC = 0x20, kD = kA / kB;\n"
                         "// constexpr int kCommented = 7;\n"
                         "template <typename T> __global__ void k(const P p, T* y) { constexpr int R = 4; }\n",
               header="struct P { long long n; };\nconstexpr int kHeader = -3;\n")
    assert [m.constant(n) for n in ("kA", "kB", "kC", "kHeader", "R")] == [128, 64, 32, -3, 4]
    with pytest.raises(ValueError, match=r"k\.cu: constexpr int kD = 'kA / kB' is not an integer literal"):
        m.constant("kD")
    with pytest.raises(KeyError, match=r"k\.cu: no 'constexpr int kCommented"):
        m.constant("kCommented")
    with pytest.raises(KeyError, match="kMissing"):
        m.constant("kMissing")


def test_constant_declared_twice_is_refused(tmp_path):
    m = module(tmp_path, "constexpr int R = 4;\nvoid f() { constexpr int R = 8; }\n")
    with pytest.raises(ValueError, match="declared 2 times"):
        m.constant("R")


def test_the_constants_the_host_reads_exist():
    names = {
        "deform_conv": ("DEFORM_OUT_PER_THREAD", "DEFORM_BIN_THREADS", "DEFORM_ATOMIC_THREADS"),
        "conv2d_igemm": ("kIgemmThreads", "kIgemmBM", "kIgemmBN", "kIgemmBK"),
        "depthwise": ("DEPTHWISE_OUT_PER_THREAD", "DEPTHWISE_TAPS_PER_THREAD"),
        "depthwise_tc": ("DWTC_MARGIN", "DWTC_WGRAD_PAIRS"),
        "involution": ("INVOLUTION_CHANNELS_PER_THREAD", "INVOLUTION_TAPS_PER_THREAD"),
        "separable": ("SEPARABLE_OUT_PER_THREAD",),
    }
    for op_module, constants in names.items():
        m = kernels_of(op_module)
        for name in constants:
            assert m.constant(name) > 0, (m.filename, name)


# --- launch arity --------------------------------------------------------------------

ARITY_SOURCE = """struct P { long long n; };
template <typename T>
__global__ void __launch_bounds__(64, 2)
k(const P p, const T* __restrict__ x, T* __restrict__ y) {  // (comma, in a comment)
  if (threadIdx.x == 0 && blockIdx.x == 0) y[0] = x[0] + T(p.n);
}
"""


def test_kernel_parameters_are_read_from_the_source(tmp_path):
    m = module(tmp_path, ARITY_SOURCE)
    assert m.kernel_parameters("k") == ("const P p", "const T* __restrict__ x", "T* __restrict__ y")


@pytest.mark.parametrize("given", [[], [np.ones(1, np.float32)], [np.ones(1, np.float32)] * 3])
def test_interpret_launch_with_the_wrong_array_count_is_refused(tmp_path, given):
    m = module(tmp_path, ARITY_SOURCE)
    with pytest.raises(TypeError, match=rf"^k \(k\.cu\) takes the params struct and 2 array arguments, got {len(given)}$"):
        _interpret.launch(m, "k", "float32", (1, 1, 1), (32, 1, 1), 0, m.params(n=1), given)
    y = np.zeros(1, np.float32)
    _interpret.launch(m, "k", "float32", (1, 1, 1), (32, 1, 1), 0, m.params(n=1), [np.full(1, 2, np.float32), y])
    assert y[0] == 3


def test_cuda_launch_with_the_wrong_array_count_is_refused_before_cupy(tmp_path, monkeypatch):
    from cuconv import _cuda

    def no_cupy():
        raise AssertionError("the arity check must come first")

    monkeypatch.setattr(_cuda, "_cupy", no_cupy)
    m = module(tmp_path, ARITY_SOURCE)
    with pytest.raises(TypeError, match=r"k \(k\.cu\) takes the params struct and 2 array arguments, got 1"):
        _cuda.launch(m, "k", "float32", (1, 1, 1), (32, 1, 1), 0, m.params(n=1), [None], 0, None)


def test_parsed_parameter_counts_match_the_compiled_kernels():
    """The cuda backend's check reads each kernel's parameter list from the text; the
    interpret backend's comes from the compiler: they agree for every registered kernel."""
    from cuconv.check import all_modules

    for m in all_modules():
        for kernel in m.kernels:
            assert len(m.kernel_parameters(kernel)) == _interpret.kernel_arity(m, kernel, m.dtypes[0]), kernel
