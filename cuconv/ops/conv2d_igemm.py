"""conv2d's algorithm='implicit_gemm': the forward pass, the input gradient (dgrad) and
the weight gradient (wgrad) as implicit GEMMs on the tensor cores (mma.sync m16n8k16,
float16 / bfloat16 storage, float32 accumulation).

Registered in conv2d's algorithm table (conv2d.CONV2D) as 'implicit_gemm' (stride-1
depthwise convs route to the banded-Toeplitz kernels of cuconv/ops/depthwise_tc.py) and
'implicit_gemm_tf32'. 'auto' considers 'implicit_gemm' only on a device whose fragment
probes passed (cuconv/_probes.py); there it goes ahead of the CUDA-core kernels where
gemm_preferred / conv2d_preferred hold (docs/autotune.md). Kernels:
kernels_cu/conv2d_igemm.cu (GEMM mappings, tiles, fragment ownership); design note and
GPU to-do list: docs/kernels/implicit_gemm.md. Not yet measured on a GPU.

Supported: float16 / bfloat16 inputs, any stride / padding / dilation, groups >= 1
(each group is its own GEMM; grouped convs with few channels per group waste most of
a 64-wide tile), plain or pixel-shuffled output (geom.upscale >= 1: the forward writes
and both gradients read the conv output at its pixel_shuffle position, as conv2d.cu's
kernels do, for subpixel_conv2d).

TF32 (algorithm='implicit_gemm_tf32', the functions' tf32=True): float32 inputs on the
tensor cores through mma.sync m16n8k8 .tf32. Every GEMM operand (x, w, grad_output as
they enter the mma) is rounded to TF32 (cvt.rna.tf32.f32: 10 explicit mantissa bits,
round to nearest, ties away from zero); products are exact and accumulation is
float32, as torch's allow_tf32=True. That is a relative input error up to 2^-11 (about
4.9e-4) instead of float32's 2^-24, so it breaks conv2d's float32 precision contract
(docs/design.md, testing) and is reached only by naming it: tf32=False with float32 is a ValueError,
and so is tf32=True with any other dtype. The bias (forward, dgrad) is added in float32
after the mma, unrounded; the bias gradient is conv2d's direct float32 kernel.

Memory: the forward and dgrad allocate only their output (the im2col / gathered
grad_output matrices are staged tile by tile in shared memory; dgrad runs one dense
sub-GEMM per stride phase, so it multiplies no structural zeros). wgrad uses a
deterministic split-K: a float32 workspace of S * Cout * Cin_g*KH*KW * 4 bytes
(S = wgrad_split(geom)[0] <= 64 K slices, fixed by the shape) holding each slice's
partial sums, reduced in fixed slice order by conv2d_igemm_reduce_splits; results are
bitwise reproducible for a given shape. The bias gradient is conv2d's direct
reduction kernel (conv2d.launch_grad_bias).

dynamic_conv2d (CondConv / DY-CNN, algorithm='implicit_gemm' in cuconv/ops/dynamic_conv.py):
launch_igemm_dynamic_forward / launch_igemm_dynamic_grad_input run the same forward and
dgrad bodies with sample b's kernel sum_j att[b, j] * w[j] mixed in the B-tile loader
(float32 sum, rounded once to the storage dtype, never stored), one GEMM per (sample,
group); they allocate nothing. Kernels: conv2d_igemm_dynamic_fwd / _bwd_input.

Index width: every launcher sets params index32 = index32_safe(geom, ...) and
launches the 32-bit kernels (conv2d_igemm_*, fewer registers: 4 blocks/SM, dgrad
pipelined) when every offset provably fits 31 bits, else their 64-bit twins
(conv2d_igemm64_*). Both give bitwise-identical results.
"""

from __future__ import annotations

import functools

from .._kernels import KernelModule
from ._algorithms import Algorithm, Passes, refuse_unsupported
from ._common import Call
from .conv2d import CONV2D, ConvGeometry, launch_grad_bias
from .depthwise_tc import depthwise_tc_forward, depthwise_tc_gradients, depthwise_tc_supported

KERNELS = KernelModule(
    "conv2d_igemm.cu",
    kernels=("conv2d_igemm_fwd", "conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight", "conv2d_igemm_reduce_splits",
             "conv2d_igemm_dynamic_fwd", "conv2d_igemm_dynamic_bwd_input",
             # 64-bit twins for tensors past 2^31 elements (index32_safe False; INDEX32 in the .cu)
             "conv2d_igemm64_fwd", "conv2d_igemm64_bwd_input", "conv2d_igemm64_bwd_weight",
             "conv2d_igemm64_dynamic_fwd", "conv2d_igemm64_dynamic_bwd_input"),
    params_struct="Conv2dIgemmParams",
    dtypes=("float16", "bfloat16", "float32"),
)
DTYPES = ("float16", "bfloat16")  # algorithm='implicit_gemm'
TF32_DTYPES = ("float32",)        # algorithm='implicit_gemm_tf32' (tf32=True): opt-in, see the module docstring
# The block size the kernels assume and their block tile (M x N, K step), read from the .cu.
_THREADS = KERNELS.constant("kIgemmThreads")
_TILE_M = KERNELS.constant("kIgemmBM")
_TILE_N = KERNELS.constant("kIgemmBN")
_TILE_K = KERNELS.constant("kIgemmBK")
# wgrad split-K rule (a shape-only choice, so results are reproducible for a shape;
# UNMEASURED, a starting point for a GPU session): aim for _SPLIT_TARGET_ITEMS work
# items (about two waves on an H100's 132 SMs), each slice at least _SPLIT_MIN_STEPS
# BK steps, at most _SPLIT_MAX slices (bounds the workspace to 64 fp32 copies of grad_w).
_SPLIT_TARGET_ITEMS = 2 * 132
_SPLIT_MIN_STEPS = 4
_SPLIT_MAX = 64
_REDUCE_THREADS = 256


def algorithm_name(tf32: bool = False) -> str:
    """The public algorithm name of this path: 'implicit_gemm', or 'implicit_gemm_tf32'."""
    return "implicit_gemm_tf32" if tf32 else "implicit_gemm"


def implicit_gemm_supported(geom: ConvGeometry, dtype: str, tf32: bool = False) -> str | None:
    """None when algorithm='implicit_gemm' (tf32=False: float16 / bfloat16) or
    algorithm='implicit_gemm_tf32' (tf32=True: float32 through TF32 tensor cores) can run
    this conv in `dtype`, else why not (a phrase that completes "supports only ...").
    Any geometry is supported, pixel-shuffled output (geom.upscale > 1) included."""
    if tf32:
        if dtype not in TF32_DTYPES:
            return f"float32 inputs (got {dtype}; float16/bfloat16 use algorithm='implicit_gemm')"
        return None
    if dtype not in DTYPES:
        if dtype in TF32_DTYPES:
            return (f"float16 and bfloat16 inputs (got {dtype}; float32 runs on the tensor cores only as "
                    f"opt-in TF32, algorithm='implicit_gemm_tf32', which rounds the inputs to 10 mantissa bits)")
        return f"float16 and bfloat16 inputs (got {dtype})"
    return None


def check_implicit_gemm(op: str, geom: ConvGeometry, dtype: str, tf32: bool = False) -> None:
    """ValueError naming algorithm='implicit_gemm' (or 'implicit_gemm_tf32') when it
    cannot run this conv."""
    refuse_unsupported(op, algorithm_name(tf32), implicit_gemm_supported(geom, dtype, tf32))


_INDEX32_LIMIT = 2**31  # every offset a 32-bit kernel forms must be below this (INDEX32 in the .cu)


def index32_safe(geom: ConvGeometry, splits: int = 1, kernels: int = 1) -> bool:
    """True when every offset the igemm kernels form for this shape fits a signed 32-bit
    int, so the 32-bit kernels (conv2d_igemm_*, params index32 = 1) compute exactly the
    offsets of the 64-bit ones (conv2d_igemm64_*): bitwise-identical results.

    Bound, from the shapes alone, generously padded: the loaders form (but never
    dereference) offsets of rows up to 63 past a GEMM edge and of k up to 31 past K, whose
    channel digit then runs up to 32 past the last channel. So: x and y with 32 spare
    channels; the weight (times dynamic_conv2d's Kn expert kernels) with Cout padded by
    64 + 32 and Cin_g by 64; wgrad's split-K workspace; twice the largest work item count
    (the grid-stride counter item + grid). Anything at or past 2^31 takes the 64-bit
    kernels."""
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    taps = geom.kernel_h * geom.kernel_w
    x = geom.batch * (geom.in_channels + _TILE_K) * geom.in_h * geom.in_w
    y = geom.batch * (geom.out_channels + _TILE_K) * geom.out_h * geom.out_w
    w = kernels * (geom.out_channels + _TILE_M + _TILE_K) * (cin_g + _TILE_N) * taps
    ws = splits * geom.out_channels * cin_g * taps
    sh, sw = geom.stride
    tiles = max(_tiles(geom.batch * geom.out_h * geom.out_w, _TILE_M) * _tiles(cout_g, _TILE_N) * geom.groups,
                geom.groups * sh * sw * _tiles(geom.batch * _tiles(geom.in_h, sh) * _tiles(geom.in_w, sw), _TILE_M)
                * _tiles(cin_g, _TILE_N),
                geom.groups * splits * _tiles(cout_g, _TILE_M) * _tiles(cin_g * taps, _TILE_N))
    return max(x, y, w, ws, 2 * tiles * geom.batch) < _INDEX32_LIMIT


def _kernel(name: str, params: dict) -> str:
    """The 32-bit entry point `name` when params['index32'], else its 64-bit twin
    (conv2d_igemm_X -> conv2d_igemm64_X)."""
    return name if params["index32"] else name.replace("conv2d_igemm_", "conv2d_igemm64_", 1)


def _params(geom: ConvGeometry, splits: int = 1, split_steps: int = 0, kernels: int = 1) -> dict:
    return dict(geom.geometry_params(), groups=geom.groups, splits=splits, split_steps=split_steps, upscale=geom.upscale, kernels=kernels,
                index32=int(index32_safe(geom, splits, kernels)))


def _tiles(n: int, tile: int) -> int:
    return -(-n // tile)


def wgrad_split(geom: ConvGeometry) -> tuple[int, int]:
    """(S, steps): wgrad's K = B*Ho*Wo is cut into S slices of `steps` BK steps each (the
    last one possibly shorter, none empty), chosen from the shape alone. The workspace is
    S * Cout * Cin_g*KH*KW float32 values."""
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    tiles = geom.groups * _tiles(cout_g, _TILE_M) * _tiles(cin_g * geom.kernel_h * geom.kernel_w, _TILE_N)
    k_steps = _tiles(geom.batch * geom.out_h * geom.out_w, _TILE_K)
    wanted = min(_tiles(_SPLIT_TARGET_ITEMS, tiles), _tiles(k_steps, _SPLIT_MIN_STEPS), _SPLIT_MAX)
    steps = max(1, _tiles(k_steps, max(1, wanted)))
    return max(1, _tiles(k_steps, steps)), steps


# The passes on explicit operands (kernel-side Arrays from call.operand / call.empty; the
# caller allocates the outputs), mirroring conv2d.launch_forward / launch_grad_input /
# launch_grad_weight: conv2d, conv_transpose2d (on the adjoint conv's geometry) and
# subpixel_conv2d (geom.upscale > 1) are each a few calls of these. Each checks
# implicit_gemm_supported(geom, call.dtype, tf32) first (ValueError before any launch):
# tf32=False takes float16 / bfloat16, tf32=True takes float32 (and only float32).

def launch_igemm_forward(call: Call, geom: ConvGeometry, x, w, bias, y, *, tf32: bool = False) -> None:
    """y = conv(x, w) + bias by conv2d_igemm_fwd; y has geom.output_shape (pixel-shuffled
    when geom.upscale > 1); bias [Cout] or None."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    m_tiles = _tiles(geom.batch * geom.out_h * geom.out_w, _TILE_M)
    n_tiles = _tiles(geom.out_channels // geom.groups, _TILE_N)
    params = _params(geom)
    call.launch(KERNELS, _kernel("conv2d_igemm_fwd", params), geom.groups * m_tiles * n_tiles, _THREADS, params,
                x, w, bias, y)


def launch_igemm_grad_input(call: Call, geom: ConvGeometry, grad_y, w, bias, grad_x, *, tf32: bool = False) -> None:
    """grad_x [B, Cin, H, W] = conv's input gradient of grad_y (geom.output_shape, read at
    its pixel-shuffled position when geom.upscale > 1), plus bias[i] per input channel i
    when bias ([Cin]) is given: None for conv2d's dgrad, the layer's bias for
    conv_transpose2d's forward. No workspace; one dense sub-GEMM per stride phase."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    # (group, stride phase, m tile, n tile); m tiles of the largest phase (see the .cu)
    sh, sw = geom.stride
    phase_pixels = geom.batch * _tiles(geom.in_h, sh) * _tiles(geom.in_w, sw)
    items = geom.groups * sh * sw * _tiles(phase_pixels, _TILE_M) * _tiles(geom.in_channels // geom.groups, _TILE_N)
    params = _params(geom)
    call.launch(KERNELS, _kernel("conv2d_igemm_bwd_input", params), items, _THREADS, params, grad_y, w, bias, grad_x)


def launch_igemm_grad_weight(call: Call, geom: ConvGeometry, grad_y, x, grad_w, *, tf32: bool = False) -> None:
    """grad_w [Cout, Cin_g, KH, KW] = conv's weight gradient (grad_y read at its
    pixel-shuffled position when geom.upscale > 1): conv2d_igemm_bwd_weight into a float32
    workspace [S, Cout, Cin_g*KH*KW] that this function allocates (S * Cout * Cin_g*KH*KW
    * 4 bytes, S = wgrad_split(geom)[0]), then conv2d_igemm_reduce_splits (fixed slice
    order: bitwise reproducible)."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    cin_g, cout_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    n = cin_g * geom.kernel_h * geom.kernel_w
    splits, steps = wgrad_split(geom)
    params = _params(geom, splits, steps)
    workspace = call.empty((splits, geom.out_channels, n), "float32")
    items = geom.groups * splits * _tiles(cout_g, _TILE_M) * _tiles(n, _TILE_N)
    call.launch(KERNELS, _kernel("conv2d_igemm_bwd_weight", params), items, _THREADS, params, grad_y, x, workspace)
    call.launch(KERNELS, "conv2d_igemm_reduce_splits", _tiles(geom.out_channels * n, _REDUCE_THREADS),
                _REDUCE_THREADS, params, workspace, grad_w)


# dynamic_conv2d (CondConv / DY-CNN) on the tensor cores: the forward and dgrad above with
# sample b's kernel M_b = sum_j att[b, j] * w[j] mixed in the B-tile loader (float32 sum,
# one rounding to the storage type; never stored), one GEMM per (sample, group). w is the
# bank [Kn, Cout, Cin_g, KH, KW], att [B, Kn], bias [Kn, Cout] or None; geom is the conv's
# geometry with one expert kernel's shape (upscale 1). See kernels_cu/conv2d_igemm.cu, DYNAMIC.

def dynamic_implicit_gemm_supported(geom: ConvGeometry, dtype: str) -> str | None:
    """None when dynamic_conv2d(..., algorithm='implicit_gemm') can run this conv in
    `dtype` (float16 / bfloat16, any stride / padding / dilation / groups), else why not
    (a phrase that completes "supports only ..."). The launchers below also take
    float32 with tf32=True, which dynamic_conv2d does not expose."""
    if dtype not in DTYPES:
        return f"float16 and bfloat16 inputs (got {dtype})"
    return None


def _dynamic_items(geom: ConvGeometry, m_pixels: int, n: int, phases: int = 1) -> int:
    return geom.batch * geom.groups * phases * _tiles(m_pixels, _TILE_M) * _tiles(n, _TILE_N)


def launch_igemm_dynamic_forward(call: Call, geom: ConvGeometry, x, w, att, bias, y, *, tf32: bool = False) -> None:
    """y [B, Cout, Ho, Wo] = conv(x[b], sum_j att[b, j] w[j]) + att @ bias by
    conv2d_igemm_dynamic_fwd; w [Kn, Cout, Cin_g, KH, KW], att [B, Kn], bias [Kn, Cout] or
    None. Allocates nothing."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    kernels = _dynamic_kernel_count(call.op, geom, w, att)
    params = _params(geom, kernels=kernels)
    call.launch(KERNELS, _kernel("conv2d_igemm_dynamic_fwd", params),
                _dynamic_items(geom, geom.out_h * geom.out_w, geom.out_channels // geom.groups), _THREADS,
                params, x, w, att, bias, y)


def launch_igemm_dynamic_grad_input(call: Call, geom: ConvGeometry, grad_y, w, att, grad_x, *,
                                    tf32: bool = False) -> None:
    """grad_x [B, Cin, H, W] = conv's input gradient of grad_y[b] with sample b's mixed
    kernel, by conv2d_igemm_dynamic_bwd_input (one dense sub-GEMM per stride phase, as
    launch_igemm_grad_input). Allocates nothing."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    kernels = _dynamic_kernel_count(call.op, geom, w, att)
    sh, sw = geom.stride
    items = _dynamic_items(geom, _tiles(geom.in_h, sh) * _tiles(geom.in_w, sw), geom.in_channels // geom.groups,
                           sh * sw)
    params = _params(geom, kernels=kernels)
    call.launch(KERNELS, _kernel("conv2d_igemm_dynamic_bwd_input", params), items, _THREADS, params,
                grad_y, w, att, grad_x)


def _dynamic_kernel_count(op: str, geom: ConvGeometry, w, att) -> int:
    """Kn from the bank w [Kn, Cout, Cin_g, KH, KW]; ValueError when att is not [B, Kn]."""
    kernels = int(w.shape[0])
    if kernels < 1 or tuple(att.shape) != (geom.batch, kernels):
        raise ValueError(f"{op}: attention must have shape {(geom.batch, kernels)} for a weight bank of shape "
                         f"{tuple(w.shape)}, got {tuple(att.shape)}")
    return kernels


def conv2d_implicit_gemm(call: Call, geom: ConvGeometry, *, tf32: bool = False):
    """conv2d's forward by implicit GEMM; `call` holds input, weight and (optional) bias,
    `geom` comes from conv_geometry (upscale > 1: the pixel-shuffled output of
    subpixel_conv2d). ValueError (before any launch) when unsupported."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    y = call.empty(geom.output_shape)
    launch_igemm_forward(call, geom, call.operand("input"), call.operand("weight"), call.operand("bias"), y,
                         tf32=tf32)
    return call.export(y)


def conv2d_implicit_gemm_gradients(call: Call, geom: ConvGeometry, wanted, has_bias: bool, *, tf32: bool = False):
    """(grad_input, grad_weight, grad_bias) of conv2d by implicit GEMM, as the caller's
    arrays (None where not in `wanted` or, for the bias, without one): the contract of
    conv2d.conv_gradients. `call` holds grad_output, input and weight; ValueError before
    any launch when algorithm='implicit_gemm' (tf32=True: 'implicit_gemm_tf32') cannot run
    this conv.

    grad_input: launch_igemm_grad_input (no bias), no workspace; for stride > 1 it runs
    one dense sub-GEMM per stride phase (SH*SW of them), so no structural zeros are
    multiplied. grad_weight: launch_igemm_grad_weight (split-K workspace [S, Cout,
    Cin_g*KH*KW] float32, S = wgrad_split(geom)[0], bitwise reproducible). grad_bias:
    conv2d's direct reduction kernel (reads grad_output at its shuffled position too)."""
    check_implicit_gemm(call.op, geom, call.dtype, tf32)
    gy = call.operand("grad_output")
    grad_input = grad_weight = grad_bias = None
    if "input" in wanted:
        grad_input = call.empty((geom.batch, geom.in_channels, geom.in_h, geom.in_w))
        launch_igemm_grad_input(call, geom, gy, call.operand("weight"), None, grad_input, tf32=tf32)
    if "weight" in wanted:
        grad_weight = call.empty(call.shape("weight"))
        launch_igemm_grad_weight(call, geom, gy, call.operand("input"), grad_weight, tf32=tf32)
    if "bias" in wanted and has_bias:
        grad_bias = call.empty((geom.out_channels,))
        launch_grad_bias(call, geom, gy, grad_bias)
    return call.export(grad_input), call.export(grad_weight), call.export(grad_bias)


# Where 'auto' puts the tensor cores ahead of the CUDA-core kernels (float16 / bfloat16 on a
# device that passed the probes; docs/autotune.md). The depthwise banded-Toeplitz kernels
# multiply the band's zeros too: about 2.7x the useful work at k = 9, 8x at k = 3, where the
# CUDA-core depthwise kernel is memory-bound anyway (docs/kernels/depthwise.md, UNMEASURED).
DEPTHWISE_TC_MIN_KERNEL = 9


def gemm_preferred(geom: ConvGeometry) -> bool:
    """Whether the implicit GEMM is the kernel for this conv: every group has more than one
    input channel. With one (depthwise, channel multipliers) a group's GEMM has K = kh*kw and
    N = the multiplier, so its 64-wide tiles hold mostly padding."""
    return geom.in_channels // geom.groups > 1


def conv2d_preferred(geom: ConvGeometry) -> bool:
    """gemm_preferred, but a depthwise conv that conv2d's 'implicit_gemm' routes to the
    banded-Toeplitz kernels is theirs from DEPTHWISE_TC_MIN_KERNEL taps a side."""
    if depthwise_tc_supported(geom, DTYPES[0]) is None:
        return min(geom.kernel_h, geom.kernel_w) >= DEPTHWISE_TC_MIN_KERNEL
    return gemm_preferred(geom)


def _register(tf32: bool) -> None:
    def forward(call: Call, geom: ConvGeometry):
        if depthwise_tc_supported(geom, call.dtype) is None:  # the banded-Toeplitz depthwise GEMM (fp16/bf16)
            return depthwise_tc_forward(call, geom)
        return conv2d_implicit_gemm(call, geom, tf32=tf32)

    def gradients(call: Call, geom: ConvGeometry, wanted, has_bias: bool):
        if depthwise_tc_supported(geom, call.dtype) is None:
            return depthwise_tc_gradients(call, geom, wanted, has_bias)
        return conv2d_implicit_gemm_gradients(call, geom, wanted, has_bias, tf32=tf32)

    passes = Passes(functools.partial(launch_igemm_forward, tf32=tf32),
                    functools.partial(launch_igemm_grad_input, tf32=tf32),
                    functools.partial(launch_igemm_grad_weight, tf32=tf32), preferred=gemm_preferred)
    CONV2D.register(Algorithm(algorithm_name(tf32), functools.partial(implicit_gemm_supported, tf32=tf32),
                              forward=forward, gradients=gradients, passes=passes,
                              rank=None if tf32 else 4,  # tf32 changes the precision contract: by name only
                              preferred=conv2d_preferred, tensor_cores=True))


_register(tf32=False)
_register(tf32=True)
