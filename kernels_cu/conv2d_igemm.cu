// conv2d_igemm: conv2d (torch.nn.functional.conv2d semantics) forward, input gradient (dgrad)
// and weight gradient (wgrad) as implicit GEMMs on the tensor cores:
//   - float16 / bfloat16 storage, float32 accumulation, mma.sync m16n8k16;
//   - float32 storage through TF32: mma.sync m16n8k8 .tf32, every operand rounded by
//     cvt.rna.tf32.f32 (10 mantissa bits, ties away from zero) as it enters the mma, float32
//     accumulation: what torch calls allow_tf32.
// Both are opt-in (algorithm="implicit_gemm" for fp16/bf16, "implicit_gemm_tf32" for float32;
// TF32 because it gives up float32 accuracy). kernels_cu/conv2d.cu is the general path, and these
// kernels compute the same results as its conv2d_fwd, conv2d_bwd_input and conv2d_bwd_weight. The
// bias gradient is conv2d.cu's conv2d_bwd_bias: a plain reduction, with no GEMM in it. On the
// interpret backend the mma and ldmatrix instructions run as mma.cuh's host fallbacks, which
// follow the PTX ISA fragment layouts (tests/kernels/mma_probe.cu pins them). Design notes,
// estimates and the GPU to-do list: docs/kernels/implicit_gemm.md.
//
// Layout (contiguous NCHW, G = groups, Cin_g = Cin/G, Cout_g = Cout/G):
//   x [B, Cin, H, W]    w [Cout, Cin_g, KH, KW]    bias [Cout] (nullable)    y [B, Cout, Ho, Wo]
//   With upscale r > 1 (subpixel_conv2d) y and dL/dy are stored pixel-shuffled, as in conv2d.cu:
//   conv channel o = c*r*r + i*r + j at pixel (oy, ox) lives at [b, c, oy*r + i, ox*r + j] of a
//   [B, Cout/r^2, Ho*r, Wo*r] tensor (ConvOutLayout, common/conv_geometry.cuh). Only the address
//   of a y / dL/dy element changes (the forward's epilogue stores there, dgrad's and wgrad's A
//   loaders read there); the GEMMs are the same.
//
// Forward, for output channel o in group g = o / Cout_g:
//   y[b,o,oy,ox] = bias[o] + sum_{c<Cin_g, ky, kx} w[o,c,ky,kx] * x[b, g*Cin_g+c, iy, ix]
//   iy = oy*SH - PH + ky*DH,  ix = ox*SW - PW + kx*DW   (terms outside the image are 0)
//
// Gradients, with gy = dL/dy [B, Cout, Ho, Wo]:
//   dL/dx[b, g*Cin_g+c, iy, ix] = sum_{o<Cout_g, ky, kx} gy[b, g*Cout_g+o, oy, ox] * w[g*Cout_g+o, c, ky, kx]
//     over the taps with oy = (iy + PH - ky*DH) / SH, ox = (ix + PW - kx*DW) / SW
//     non-negative integers (exact division) and oy < Ho, ox < Wo
//   dL/dw[g*Cout_g+o, c, ky, kx] = sum_{b, oy, ox} gy[b, g*Cout_g+o, oy, ox] * x[b, g*Cin_g+c, iy, ix]
//     (iy, ix as in the forward; terms outside the image are 0)
//   conv2d_igemm_bwd_input also takes a nullable bias [Cin] added per INPUT channel
//   (grad_x[b, i, ...] += bias[i]): null for conv2d's dgrad, the layer's bias when the kernel is
//   conv_transpose2d's forward (the adjoint conv), as conv2d.cu's conv2d_bwd_input.
//
// The three passes share one tile shape, one thread mapping, one fragment layout and one K loop
// (igemm_mainloop); each supplies its A and B loaders and its epilogue. The forward is described
// first; the dgrad and wgrad sections say what differs.
//
// FORWARD GEMM mapping (conv2d_igemm_fwd), per group g:  Y_g[m, n] = sum_k A[m, k] * B[k, n]
//   m = (b*Ho + oy)*Wo + ox        M = B*Ho*Wo     (output pixels of the whole batch)
//   n = output channel in group    N = Cout_g
//   k = (c*KH + ky)*KW + kx        K = Cin_g*KH*KW (the filter's flattened order)
//   A[m, k] = x[b, g*Cin_g+c, iy, ix] or 0 outside the image: im2col, gathered tile by tile into
//             shared memory and never materialised in device memory (it is KH*KW times x)
//   B[k, n] = w[g*Cout_g + n, c, ky, kx]: each weight row is already K-contiguous, which is the
//             ".col" B operand of mma.sync
//
// Tiles and thread mapping (128 threads = 4 warps per block; IgemmThread):
//   Block tile 64 (M) x 64 (N), K walked in steps of BK = 32. Work items are (group, m tile,
//   n tile), the n tile fastest, walked by a grid-stride loop, so any grid size is correct.
//   Per BK step the block stages A as a_tile[64][ld] and B as b_tile[64][ld], both K-contiguous so
//   that one fragment loader (ldmatrix) serves both; ld = 32 + 8 (fp16/bf16) or 32 + 4 (float):
//   rows padded by 16 bytes, so that a warp's fragment loads, rows g = 0..7 x columns t = 0..3, hit
//   32 distinct banks (10 KB of static shared memory per buffer for fp16/bf16, 18 KB for float).
//   Each thread stages 16 elements of each tile per step, with one of two mappings:
//     row loaders (the fwd and dgrad A gathers): thread tid owns GEMM row tid / 2 (its pixel
//       decoded once per tile) and k = tid%2 + 2i, i < 16. A warp's load reads 16 consecutive
//       pixels (consecutive ox of one input row: coalesced for stride 1) at 2 adjacent k. The
//       thread's k walks the whole K in steps of 2, so its (c, ky, kx) digits are stepped by
//       compare-and-carry (igemm_carry; decoded by division once per tile, never per element).
//       Staging store: ldmatrix needs 16-byte-aligned rows, so the row pitch is a multiple of 4
//       banks and one k reaches only 8 banks across rows. Two lanes per row on adjacent k share
//       a 4-byte word (fp16 / bf16), so a warp's store touches 16 words on 8 banks: 2 wavefronts,
//       where 32 rows at one k would take 4.
//     column loaders (every B, and wgrad's A): thread tid owns k = tid % 32 and tile rows
//       tid/32 + 4i, i < 16. Consecutive threads read consecutive k: coalesced along each
//       K-contiguous row (the fwd weight rows, wgrad's pixels).
//   Out-of-range m, n, k (edge tiles, K not a multiple of 32) and padding taps are staged as 0,
//   so every mma runs unmasked and only the epilogue's stores are masked.
//   Warp w owns the 32 x 32 sub-tile at (32*(w % 2), 32*(w / 2)) = 2 (M) x 4 (N) m16n8 tiles, 32
//   float accumulators per lane; per BK step 2 k16 slices x 8 mma m16n8k16 (fp16/bf16), or 4 k8
//   slices x 8 mma m16n8k8 .tf32 (float; igemm_mma_step).
//   Fragment ownership (mma.cuh, PTX ISA m16n8k16 layout), lane = 4*gid + tid4:
//     A regs: a_tile[row0 + gid (+8)][k16 + 2*tid4 (+8) .. +1]
//     B regs: b_tile[col0 + gid][k16 + 2*tid4 (+8) .. +1]
//     D:      acc[mi][ni][2h + j] = Y[row0 + gid + 8h][col0 + 2*tid4 + j]
//   loaded with ldmatrix.x4 (two per A k16 slice, one per pair of B n8 tiles: 6 shared-memory
//   instructions per k16 slice instead of 16), or with 4-byte loads of the same registers in the
//   64-bit dgrad twins (what fits their registers; PIPELINE). float / tf32: A regs a_tile[row0 + gid
//   (+8)][k8 + tid4 (+4)], B regs b_tile[col0 + gid][k8 + tid4 (+4)], each element rounded by
//   cvt.rna.tf32.f32 as it leaves shared memory; D the same.
//   Epilogue (igemm_epilogue): y = from_acc<T>(acc + bias[o]) straight from the accumulator
//   fragments, stored at y's (possibly pixel-shuffled) position: one rounding per output.
// Determinism: every output's K sum runs in one fixed order (the k steps, then the mma's own
// reduction); no atomics, and wgrad's split-K partials are summed in slice order (below).
// Bitwise reproducible for a given shape.
//
// PIPELINE (igemm_mainloop; every kernel but the 64-bit dgrad twins): register-prefetch software
// pipelining over two shared buffers per tile, one __syncthreads per BK step, so that a step's
// global loads are in flight while the previous step's mma runs. Iteration s (s = 0 .. steps):
//   1. s < steps: gather step s from global memory into registers (16 A elements, and 16 B ones
//      where B is prefetched): the loads are issued, nothing waits on them yet;
//   2. s > 0: the mma of step s - 1 from buffer buf ^ 1, overlapping those loads;
//   3. s < steps: store the registers into buffer buf, __syncthreads, buf ^= 1.
// One barrier suffices: a store into buf at iteration s overwrites what the mma of iteration s - 1
// read, and every thread finished that mma before the barrier of iteration s - 1, which this thread
// has passed; the mma of iteration s + 1 reads buf after the barrier of iteration s. buf runs on
// across work items (never reset), so an item's first store goes to the buffer the previous item's
// last mma did NOT read. The staged values, the mma inputs and the k order are those of a plain
// stage-then-mma loop, so the results are too.
// Not prefetched: the dynamic kernels' B mixture (Kn loads and FMAs per element, built at store
// time): held across the mma it would need about 208 registers.
// Not pipelined: the 64-bit dgrad twins (conv2d_igemm64_bwd_input, _dynamic_bwd_input), whose
// phase bookkeeping in 64 bits leaves no room for the prefetch registers: one buffer per tile, a
// barrier before and after staging, 4-byte fragment loads, 168 registers (3 blocks per SM).
// Register budget (NVRTC sm_80 / sm_90, 0 spills): __launch_bounds__(128, 4) (at most 128
// registers, 4 blocks of 4 warps per SM) for the 32-bit fwd, dynamic fwd and wgrad and the 32-bit
// fp16/bf16 dgrad; (128, 3) for the 32-bit float dgrad (it spills at 128: 4 k8 slices per step)
// and the 64-bit fwd and wgrad twins; no minimum for the 64-bit dgrads (they land at 168) and the
// 32-bit dynamic dgrad (at 128). Static shared memory: 20 KB (fp16/bf16) / 36 KB (float) for the
// pipelined kernels, + 1 KB of per-item tables for wgrad (2 KB in its 64-bit twin), under the
// 48 KB static limit.
//
// INDEX32: every body is templated on its index type I. The conv2d_igemm_* kernels use I = int
// (fewer registers: the 4 blocks per SM above) and run only when p.index32 = 1, which the host
// (cuconv/ops/conv2d_igemm.py, index32_safe) sets when x and y (with 32 spare channels), the
// weight (Kn expert kernels, Cout padded by 96, Cin_g by 64), wgrad's workspace and twice the work
// item count are all below 2^31 elements: that bounds every offset the loaders form, including
// the never-dereferenced ones of rows and k past the GEMM edge. conv2d_igemm64_* (I = index_t)
// take everything else. Both compute the same offsets, hence bitwise-identical outputs (tests:
// test_index32_*).
//
// DGRAD GEMM mapping (conv2d_igemm_bwd_input), stride phase decomposition: for a given input
// pixel only the taps with (iy + PH - ky*DH) % SH == 0 (and likewise in x) reach an output pixel,
// so a plain GEMM over all taps would gather (SH*SW - 1)/(SH*SW) structural zeros into A and
// spend their mma (4x the work at stride 2, 9x at stride 3). Instead the input pixels are split
// into SH*SW phases (ry, rx) = ((iy + PH) % SH, (ix + PW) % SW); within a phase the landing taps
// are the same for every pixel, ky = ky0 + sy*jy with ky*DH = ry (mod SH), sy = SH / gcd(DH, SH)
// (IgemmPhase; likewise kx), and each phase is a dense sub-GEMM. Per group g and phase (ry, rx):
//   m = (b*Hr + u)*Wr + v          M = B*Hr*Wr     (the phase's input pixels
//                                                   iy = iy0_r + SH*u, ix = ix0_r + SW*v)
//   n = input channel in group     N = Cin_g
//   k = (o*nky + jy)*nkx + jx      K = Cout_g*nky*nkx (only the phase's taps)
//   A[m, k] = gy[b, g*Cout_g+o, oy, ox], oy = (iy + PH - ky*DH) / SH (exact by construction; 0
//             where oy or ox falls outside [0, Ho) x [0, Wo)): a row loader like the forward's A;
//             oy = oy0 - jy*(sy*DH/SH) is stepped, never divided
//   B[k, n] = w[g*Cout_g + o, n, ky, kx]: for a fixed n this is NOT K-contiguous (its k neighbours
//             are KW or more elements apart within one o and Cin_g*KH*KW apart across o), so the
//             column loader reads it with stride KH*KW and stages it transposed into the same
//             K-contiguous b_tile[n][k] the fragments read. Both loaders step their (o, jy, jx)
//             digits (and A's possibly shuffled gy channel offset) by compare-and-carry.
//   Work items are (group, phase, m tile, n tile), the n tile fastest, with the m tile count of
//   the largest phase (ceil(H/SH)*ceil(W/SW) pixels per image): one grid serves every phase, and a
//   smaller phase's surplus tiles skip at once. A phase with no landing tap (K = 0, e.g.
//   DH % SH == 0 and ry != 0) writes zeros (or the bias). Stride 1 is the single phase with every
//   tap. Epilogue: grad_x = from_acc<T>(acc + bias[g*Cin_g + n]) at (iy, ix) (bias nullable),
//   masked like the forward's; stores are SW apart along x for stride > 1.
//
// WGRAD GEMM mapping (conv2d_igemm_bwd_weight), per group g:
//   m = output channel in group    M = Cout_g
//   n = (c*KH + ky)*KW + kx        N = Cin_g*KH*KW (grad_w's flattened filter order)
//   k = (b*Ho + oy)*Wo + ox        K = B*Ho*Wo     (huge: 256*56*56 = 802816 for a
//                                                   ResNet-50 stage-1 layer)
//   A[m, k] = gy[b, g*Cout_g+m, oy, ox]: pixel-contiguous per channel, K-contiguous rows
//   B[k, n] = x[b, g*Cin_g+c, iy, ix] or 0 outside the image: the im2col matrix again, gathered
//             along K (pixels) this time
//   Both tiles use the column loader: the thread's pixel k = tid % 32 ((b, oy, ox) stepped by 32
//   per BK step with compare-and-carry) is shared by its 16 A and 16 B rows, whose gy channel
//   offsets and x tap offsets (c*H*W + ky*DH*W + kx*DW, ky*DH, kx*DW) are the same at every step
//   of an item: they are tabled in shared memory once per item.
//   Deterministic split-K, because K is huge and the (m tile, n tile) pairs are few: the host
//   fixes a number of K slices S from the shape alone (cuconv/ops/conv2d_igemm.py, wgrad_split:
//   enough (group, m tile, n tile, slice) items for about two waves on 132 SMs, each slice at
//   least 4 BK steps, at most 64 slices); slice s covers k in [s*L, min(K, (s+1)*L)),
//   L = p.split_steps*32, the last one possibly partial, none empty. Work items are (group,
//   slice, m tile, n tile), the n tile fastest; each writes its whole fp32 partial tile (zeros
//   included, so every entry is written even for B = 0) into
//     workspace [S, Cout, Cin_g*KH*KW] float32   (S * Cout * Cin_g*KH*KW * 4 bytes)
//   and conv2d_igemm_reduce_splits then sums the S partials of each weight in slice order
//   0..S-1 and rounds once to T. No atomics: bitwise reproducible for a shape.
//
// DYNAMIC (per-sample mixed) kernels, conv2d_igemm_dynamic_fwd / _dynamic_bwd_input, for
// dynamic_conv2d (CondConv / DY-CNN, cuconv/ops/dynamic_conv.py, algorithm="implicit_gemm"):
//   wbank [Kn, Cout, Cin_g, KH, KW] (Kn = p.kernels expert kernels), att [B, Kn],
//   bias [Kn, Cout] (nullable; forward only), and sample b's kernel is
//   M_b[o, c, ky, kx] = sum_{j<Kn} att[b, j] * wbank[j, o, c, ky, kx]
//   y[b] = conv(x[b], M_b) + sum_j att[b, j] * bias[j, :];  dL/dx[b] = conv's dgrad of gy[b] with M_b.
// Same GEMMs, tiles, fragments and epilogues as the forward / dgrad above (one kernel body each,
// templated on the weight source, IgemmWeights / IgemmMixedWeights), with two differences:
//   - Work items gain the sample: (b, group, m tile, n tile) (dgrad: (b, group, phase, m tile,
//     n tile)), n tile fastest, and each GEMM's M covers the pixels of ONE image (Ho*Wo, or the
//     phase's Hr*Wr), since B differs per sample. p.batch images = p.batch GEMMs per group.
//   - The B loader builds each staged element on the fly: B[k, n] = from_acc<T>(sum_j att[b, j] *
//     wbank[j, ...]) with the Kn products summed in float32 in order j = 0..Kn-1 (FMA-contracted
//     on the GPU) and rounded ONCE to T before staging: the mixed kernel the mma sees is M_b
//     rounded to T, as a user materialising it in T would get (so the reference comparison anchors
//     on torch with the mixed kernel rounded to T). float32 with TF32 then rounds that value to
//     TF32 in the fragment load, like any other float32 operand.
//   The forward epilogue adds the bias mixture sum_j att[b, j] * bias[j, o] in float32 (unrounded)
//   to the accumulator before the single rounding of y. Nothing of size B*Cout*Cin_g*KH*KW exists
//   anywhere: the mixture lives only in the staged b_tile. Deterministic as the plain kernels
//   (fixed order, no atomics).
#include "common/cuconv.cuh"
#include "common/conv_geometry.cuh"
#include "common/mma.cuh"

// The conv's shape (ConvGeometryParams) and this module's fields; every field is a 64-bit
// integer so the host can pack it as a flat int64 array.
struct Conv2dIgemmParams : ConvGeometryParams {
  long long groups;
  long long splits, split_steps;  // wgrad only: K slices S and BK steps per slice (fwd/dgrad: 1, 0)
  long long upscale;              // 1, or the pixel-shuffle factor r of y / dL/dy (subpixel_conv2d)
  long long kernels;              // dynamic kernels only: Kn, the expert kernels mixed per sample (else 1)
  long long index32;              // 1: the host proved every offset fits 32 bits (INDEX32); launch the 32-bit kernels
};

// The params' shape fields converted once to a body's index type I: int in the conv2d_igemm_*
// kernels, index_t in the conv2d_igemm64_* twins (header: INDEX32).
template <typename I>
struct IgemmDims {
  I batch, in_channels, in_h, in_w, out_channels, out_h, out_w;
  I kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  I groups, splits, split_steps, upscale, kernels;
  __device__ explicit IgemmDims(const Conv2dIgemmParams& p)
      : batch(I(p.batch)), in_channels(I(p.in_channels)), in_h(I(p.in_h)), in_w(I(p.in_w)),
        out_channels(I(p.out_channels)), out_h(I(p.out_h)), out_w(I(p.out_w)), kernel_h(I(p.kernel_h)),
        kernel_w(I(p.kernel_w)), stride_h(I(p.stride_h)), stride_w(I(p.stride_w)), pad_h(I(p.pad_h)),
        pad_w(I(p.pad_w)), dilation_h(I(p.dilation_h)), dilation_w(I(p.dilation_w)), groups(I(p.groups)),
        splits(I(p.splits)), split_steps(I(p.split_steps)), upscale(I(p.upscale)), kernels(I(p.kernels)) {}
};
// cuconv.cuh's ceil_div / min_index (which take index_t) in the index type I.
template <typename I>
__device__ __forceinline__ I igemm_ceil_div(I a, I b) { return (a + b - 1) / b; }
template <typename I>
__device__ __forceinline__ I igemm_min(I a, I b) { return a < b ? a : b; }

// One step of a mixed-radix walk (hi, mid, lo) with radices (-, r_mid, r_lo) whose step digits have
// just been added: each step digit is below its radix and a carry-in is at most 1, so one
// compare-and-subtract per digit restores lo < r_lo and mid < r_mid; returns the carry into hi.
template <typename I>
__device__ __forceinline__ bool igemm_carry(I& mid, I& lo, I r_mid, I r_lo) {
  if (lo >= r_lo) {
    lo -= r_lo;
    ++mid;
  }
  if (mid >= r_mid) {
    mid -= r_mid;
    return true;
  }
  return false;
}

constexpr int kIgemmThreads = 128;                    // 4 warps; the host launches exactly this
constexpr int kIgemmBM = 64, kIgemmBN = 64, kIgemmBK = 32;
// fwd / dgrad A gather: a thread's staged k advance by this much per element (kIgemmBK / it
// elements per BK step), and the k-column loaders' (fwd / dgrad B, wgrad) k by kIgemmBK per step.
constexpr int kIgemmAStep = kIgemmThreads / kIgemmBM;
// Elements of each tile a thread stages per BK step, and the row distance of the k-column loaders.
constexpr int kIgemmElems = kIgemmBM * kIgemmBK / kIgemmThreads;
constexpr int kIgemmColStep = kIgemmThreads / kIgemmBK;
static_assert(kIgemmBM == kIgemmBN && kIgemmBN * kIgemmBK / kIgemmThreads == kIgemmElems,
              "one tile shape and one element count for A and B");
// A staged tile row: BK elements padded by 16 bytes (8 halves, 4 floats), so that the
// fragment loads of a warp hit 32 distinct banks (rows g = 0..7 x columns t = 0..3).
template <typename T>
struct IgemmTile {
  static constexpr int ld = kIgemmBK + 16 / int(sizeof(T));
};

// The block's 64 x 64 fp32 accumulator tile, spread over the 4 warps (layout above).
typedef float IgemmAcc[2][4][4];

__device__ __forceinline__ void igemm_zero(IgemmAcc& acc) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;
}

// One BK step of the warp's 32 x 32 sub-tile: acc += a_tile[warp_m.., :] * b_tile[warp_n.., :]^T,
// both tiles K-contiguous [64][ld]. Warp-wide: every lane calls it. fp16 / bf16: 2 k16 slices
// of m16n8k16.
template <typename T>
__device__ __forceinline__ void igemm_mma_step(IgemmAcc& acc, const T* a_tile, const T* b_tile, int warp_m,
                                               int warp_n, int gid, int tid4, bool use_ldmatrix = true) {
  constexpr int kIgemmLd = IgemmTile<T>::ld;
  // ldmatrix.x4 (mma.cuh: mma_ldmatrix_x4): lane 8i + j supplies row j of 8x8 matrix i. For A the
  // matrices are (rows +0, k +0), (rows +8, k +0), (rows +0, k +8), (rows +8, k +8), which delivers
  // exactly af[mi][0..3] below; for B (K-contiguous b_tile[n][k]) they are (n +0, k +0), (n +0, k +8),
  // (n +8, k +0), (n +8, k +8): bf[ni][0], bf[ni][1], bf[ni+1][0], bf[ni+1][1]. The same register
  // bits as four 4-byte loads each (A[gid (+8)][2t (+8) ..], B[2t (+8) ..][gid]): bitwise-identical
  // mma inputs, in 6 instead of 16 shared-memory instructions per k16 slice. Every row start is
  // 16-byte aligned (ld = 40 halves = 80 bytes, k offsets 0 / 8 / 16 / 24 halves, tiles __align__(16))
  // and a phase of 8 rows 80 bytes apart covers 32 distinct banks.
  const int lane = 4 * gid + tid4;
  const int a_ld_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_ld_k = 8 * (lane >> 4);
  const int b_ld_row = (lane & 7) + 8 * (lane >> 4), b_ld_k = 8 * ((lane >> 3) & 1);
#pragma unroll
  for (int ks = 0; ks < kIgemmBK; ks += 16) {
    mma_reg_t af[2][4], bf[4][2];
    if (use_ldmatrix) {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        mma_ldmatrix_x4(af[mi], a_tile + (warp_m + 16 * mi + a_ld_row) * kIgemmLd + ks + a_ld_k);
#pragma unroll
      for (int ni = 0; ni < 4; ni += 2) {
        mma_reg_t r[4];
        mma_ldmatrix_x4(r, b_tile + (warp_n + 8 * ni + b_ld_row) * kIgemmLd + ks + b_ld_k);
        bf[ni][0] = r[0];      // B[2t..][gid] of n tile ni
        bf[ni][1] = r[1];      // B[2t+8..][gid]
        bf[ni + 1][0] = r[2];  // the same of n tile ni + 1
        bf[ni + 1][1] = r[3];
      }
    } else {  // 4-byte loads of the same registers (the 64-bit dgrad twins: no registers to spare)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const T* base = a_tile + (warp_m + 16 * mi + gid) * kIgemmLd + ks + 2 * tid4;
        af[mi][0] = mma_load_pair(base);                     // A[gid][2t..]
        af[mi][1] = mma_load_pair(base + 8 * kIgemmLd);      // A[gid+8][2t..]
        af[mi][2] = mma_load_pair(base + 8);                 // A[gid][2t+8..]
        af[mi][3] = mma_load_pair(base + 8 * kIgemmLd + 8);  // A[gid+8][2t+8..]
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const T* base = b_tile + (warp_n + 8 * ni + gid) * kIgemmLd + ks + 2 * tid4;
        bf[ni][0] = mma_load_pair(base);      // B[2t..][gid]
        bf[ni][1] = mma_load_pair(base + 8);  // B[2t+8..][gid]
      }
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni]);
  }
}

// float32 (TF32, opt-in): the same BK step as 4 k8 slices of m16n8k8.tf32; every fragment
// element is rounded by mma_to_tf32 (cvt.rna.tf32.f32) as it is loaded from the tile.
// Fragment ownership (mma.cuh, PTX ISA m16n8k8 .tf32 layout), lane = 4*gid + tid4:
//   A regs: a_tile[row0 + gid (+8)][k8 + tid4 (+4)],  B regs: b_tile[col0 + gid][k8 + tid4 (+4)],
//   D: as for fp16 / bf16. The overload wins over the template for T = float.
__device__ __forceinline__ void igemm_mma_step(IgemmAcc& acc, const float* a_tile, const float* b_tile, int warp_m,
                                               int warp_n, int gid, int tid4, bool = true) {
  constexpr int ld = IgemmTile<float>::ld;
#pragma unroll
  for (int ks = 0; ks < kIgemmBK; ks += 8) {
    mma_reg_t af[2][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const float* base = a_tile + (warp_m + 16 * mi + gid) * ld + ks + tid4;
      af[mi][0] = mma_to_tf32(base[0]);           // A[gid][t]
      af[mi][1] = mma_to_tf32(base[8 * ld]);      // A[gid+8][t]
      af[mi][2] = mma_to_tf32(base[4]);           // A[gid][t+4]
      af[mi][3] = mma_to_tf32(base[8 * ld + 4]);  // A[gid+8][t+4]
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const float* base = b_tile + (warp_n + 8 * ni + gid) * ld + ks + tid4;
      bf[ni][0] = mma_to_tf32(base[0]);  // B[t][gid]
      bf[ni][1] = mma_to_tf32(base[4]);  // B[t+4][gid]
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_m16n8k8_tf32(acc[mi][ni], af[mi], bf[ni]);
  }
}

// The thread's roles in a block of kIgemmThreads (the mapping in the header).
struct IgemmThread {
  int gid, tid4;       // mma fragment coordinates: lane = 4*gid + tid4
  int warp_m, warp_n;  // the warp's 32 x 32 sub-tile of the block tile
  int row_m, row_k;    // row loaders (fwd / dgrad A): tile row row_m, k = row_k + kIgemmAStep*i
  int col_k, col_row;  // k-column loaders (every B, wgrad's A): tile column col_k, rows col_row + 4i
  __device__ IgemmThread() {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    gid = lane >> 2;
    tid4 = lane & 3;
    warp_m = 32 * (warp & 1);
    warp_n = 32 * (warp >> 1);
    // A row's two threads are adjacent lanes: header, row loaders (the staging store's banks).
    row_m = tid / kIgemmAStep;
    row_k = tid % kIgemmAStep;
    col_k = tid % kIgemmBK;
    col_row = tid / kIgemmBK;
  }
};

// The K loop of one work item, the same for every pass: acc = the sum over the BK steps from k_first
// to k_end, in order, of the staged A tile (64 x BK) times the staged B tile (BK x 64). The pass
// supplies the staged values through four callables (lambdas over its per-item state; everything is
// inlined, so each pass compiles as if the loop were written out in it):
//   begin(k0)    the step's decode before its A elements (k0 = the step's first k)
//   a(i, k)      the thread's A element i < kIgemmElems of the step, at GEMM k (the pass's A walk
//                advances by one element)
//   b_begin(k0)  the step's decode for B, after the A elements
//   b(i)         the thread's B element i of the step begun last
// kARows: a thread owns a GEMM row (fwd, dgrad): A element i is at tile row row_m, column kk = row_k +
// kIgemmAStep*i, k = k0 + kk. Otherwise it owns a k column (wgrad): A element i is at row col_row + 4i,
// column col_k, k = k0 + col_k. B element i is always at row col_row + 4i, column col_k. Out-of-range
// elements must be staged as zero (no mma is masked).
//
// kPipelined (header: PIPELINE): two shared buffers per tile, register prefetch, one __syncthreads
// per step, ldmatrix fragments. kPrefetchB: B is gathered into registers with A; otherwise (a
// per-sample weight mixture: Kn loads and FMAs per element, too many registers to hold across the
// mma) b(i) is evaluated at store time, after the mma. buf is the buffer the next step is staged in;
// it runs on across work items (the caller keeps it), so an item's first store goes to the buffer
// the previous item's last mma did not read.
// !kPipelined (the 64-bit dgrad twins, whose registers do not fit the prefetch): one buffer per tile,
// a barrier before and after staging, 4-byte fragment loads.
// Both stage the same values and run the same mma in the same order: bitwise-identical results.
template <typename T, bool kPipelined, bool kARows, bool kPrefetchB, typename I, typename Begin, typename A,
          typename BBegin, typename B>
__device__ __forceinline__ void igemm_mainloop(IgemmAcc& acc, int& buf, const IgemmThread& th, I k_first, I k_end,
                                               Begin begin, A a, BBegin b_begin, B b) {
  constexpr int ld = IgemmTile<T>::ld, kTileElems = kIgemmBM * ld, kBuffers = kPipelined ? 2 : 1;
  __align__(16) __shared__ T a_tile[kBuffers * kTileElems];
  __align__(16) __shared__ T b_tile[kBuffers * kTileElems];
  auto b_at = [&](int i) { return (th.col_row + kIgemmColStep * i) * ld + th.col_k; };
  igemm_zero(acc);
  I k0 = k_first;  // the first k of the step being staged
  if constexpr (kPipelined) {
    // Iteration s: (1) s < steps: gather step s into registers (the loads are issued, nothing waits
    // on them yet); (2) s > 0: the mma of step s - 1 from buffer buf ^ 1, overlapping those loads;
    // (3) s < steps: store step s into buffer buf, __syncthreads, buf ^= 1.
    const I steps = k_end > k_first ? igemm_ceil_div<I>(k_end - k_first, I(kIgemmBK)) : 0;
    T a_reg[kIgemmElems], b_reg[kIgemmElems];
    for (I s = 0; s <= steps && steps > 0; ++s) {
      if (s < steps) {
        begin(k0);
#pragma unroll
        for (int i = 0; i < kIgemmElems; ++i) a_reg[i] = a(i, kARows ? k0 + th.row_k + kIgemmAStep * i : k0 + th.col_k);
        b_begin(k0);
        if (kPrefetchB) {
#pragma unroll
          for (int i = 0; i < kIgemmElems; ++i) b_reg[i] = b(i);
        }
        k0 += kIgemmBK;
      }
      if (s > 0)  // step s - 1, staged in buffer buf ^ 1
        igemm_mma_step(acc, a_tile + (buf ^ 1) * kTileElems, b_tile + (buf ^ 1) * kTileElems, th.warp_m, th.warp_n,
                       th.gid, th.tid4);
      if (s < steps) {
        T* a_dst = a_tile + buf * kTileElems;
        T* b_dst = b_tile + buf * kTileElems;
#pragma unroll
        for (int i = 0; i < kIgemmElems; ++i)
          a_dst[kARows ? th.row_m * ld + th.row_k + kIgemmAStep * i : b_at(i)] = a_reg[i];
        if (kPrefetchB) {
#pragma unroll
          for (int i = 0; i < kIgemmElems; ++i) b_dst[b_at(i)] = b_reg[i];
        } else {
#pragma unroll 4
          for (int i = 0; i < kIgemmElems; ++i) b_dst[b_at(i)] = b(i);
        }
        __syncthreads();  // step s is staged; every warp's mma of step s - 1 (buffer buf ^ 1) is done
        buf ^= 1;
      }
    }
  } else {
    static_assert(kARows, "the unpipelined loop stages A by rows (dgrad)");
    while (k0 < k_end) {
      __syncthreads();  // the previous step's tiles have been consumed by every warp
      begin(k0);
#pragma unroll 4
      for (int i = 0; i < kIgemmElems; ++i) {
        const int kk = th.row_k + kIgemmAStep * i;
        a_tile[th.row_m * ld + kk] = a(i, k0 + kk);
      }
      b_begin(k0);
#pragma unroll 4
      for (int i = 0; i < kIgemmElems; ++i) b_tile[b_at(i)] = b(i);
      __syncthreads();
      igemm_mma_step(acc, a_tile, b_tile, th.warp_m, th.warp_n, th.gid, th.tid4, /*use_ldmatrix=*/false);
      k0 += kIgemmBK;
    }
  }
}

// The epilogue's walk over the thread's accumulators: acc[mi][ni][2h + j] is the item's GEMM element
// (m0 + warp_m + 16mi + gid + 8h, n0 + warp_n + 8ni + 2tid4 + j). For each of the thread's rows
// m < M, row(m) decodes what the row's stores share and returns store(n, v), which is called for each
// of the row's columns n < N with the fp32 accumulator v.
template <typename I, typename Row>
__device__ __forceinline__ void igemm_epilogue(const IgemmAcc& acc, const IgemmThread& th, I m0, I n0, I M, I N,
                                               Row row) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const I m = m0 + th.warp_m + 16 * mi + th.gid + 8 * h;
      if (m >= M) continue;
      const auto store = row(m);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const I n = n0 + th.warp_n + 8 * ni + 2 * th.tid4 + j;
          if (n < N) store(n, acc[mi][ni][2 * h + j]);
        }
      }
    }
  }
}

// Where the forward's and dgrad's B operand (the conv weight, in its [Cout, Cin_g, KH, KW]
// flattened order e) and the bias come from. IgemmWeights: conv2d's own, one GEMM over the
// whole batch. IgemmMixedWeights: dynamic_conv2d's per-sample mixture of p.kernels expert
// kernels (header: DYNAMIC), one GEMM per sample; for_sample(b) selects attention row b.
template <typename T>
struct IgemmWeights {
  static constexpr bool per_sample = false;
  const T* w;
  const T* bias;  // nullable; [Cout] (forward) or [Cin] (dgrad)
  __device__ IgemmWeights for_sample(index_t) const { return *this; }
  template <typename I>
  __device__ __forceinline__ T weight(I e) const { return w[e]; }
  template <typename I>
  __device__ __forceinline__ float bias_at(I i) const { return to_acc(bias[i]); }
};

template <typename T>
struct IgemmMixedWeights {
  static constexpr bool per_sample = true;
  const T* w;     // [Kn, Cout, Cin_g, KH, KW]
  const T* att;   // [B, Kn] (for_sample: row b)
  const T* bias;  // nullable; [Kn, Cout] (forward only)
  index_t kernels, bank, channels;  // Kn, Cout*Cin_g*KH*KW (one expert kernel), Cout
  __device__ IgemmMixedWeights for_sample(index_t b) const {
    IgemmMixedWeights s = *this;
    s.att = att + b * kernels;
    return s;
  }
  // M_b[e] = sum_j att[b, j] * w[j, e]: float32 sum in order j, ONE rounding to T (header).
  template <typename I>
  __device__ __forceinline__ T weight(I e) const {
    float v = 0.0f;
    for (I j = 0; j < I(kernels); ++j) v += to_acc(att[j]) * to_acc(w[j * I(bank) + e]);
    return from_acc<T>(v);
  }
  // sum_j att[b, j] * bias[j, o] in float32, unrounded (added to the fp32 accumulator).
  template <typename I>
  __device__ __forceinline__ float bias_at(I o) const {
    float v = 0.0f;
    for (I j = 0; j < I(kernels); ++j) v += to_acc(att[j]) * to_acc(bias[j * I(channels) + o]);
    return v;
  }
};

// The forward (GEMM mapping in the header) for one weight source: conv2d_igemm_fwd (one GEMM
// per group over the whole batch) and conv2d_igemm_dynamic_fwd (one per sample and group).
template <typename T, typename Weights, typename I>
__device__ __forceinline__ void igemm_fwd_body(const Conv2dIgemmParams& params, const T* __restrict__ x,
                                               const Weights& weights, T* __restrict__ y) {
  const IgemmDims<I> p(params);  // the shape in the index type I (INDEX32)
  const IgemmThread th;
  int buf = 0;  // igemm_mainloop's next staging buffer, kept across work items
  const I cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const I taps = p.kernel_h * p.kernel_w, K = cin_g * taps;
  // per_sample: p.batch GEMMs of one image each; else one GEMM over the p.batch images
  const I samples = Weights::per_sample ? p.batch : 1, images = Weights::per_sample ? 1 : p.batch;
  const I pixels = p.out_h * p.out_w, M = images * pixels;
  const I m_tiles = igemm_ceil_div<I>(M, kIgemmBM), n_tiles = igemm_ceil_div<I>(cout_g, kIgemmBN);
  const I items = samples * p.groups * m_tiles * n_tiles;
  const T zero = from_acc<T>(0.0f);
  // The A gather's k walk (k = row_k + kIgemmAStep*j over the whole K, j counting every staged element
  // of every BK step) in the mixed radix (c, ky, kx): each element adds the constant digits
  // (kIgemmAStep / taps, (kIgemmAStep / KW) % KH, kIgemmAStep % KW), carried by compare-and-subtract
  // (each step digit is below its radix, so one carry per digit suffices): no division per element.
  const I in_pixels = p.in_h * p.in_w;
  const int step_kx = int(kIgemmAStep % p.kernel_w), step_ky = int((kIgemmAStep / p.kernel_w) % p.kernel_h);
  const I step_c = (kIgemmAStep / taps) * in_pixels;

  for (I item = blockIdx.x; item < items; item += gridDim.x) {
    const I n_tile = item % n_tiles, m_tile = (item / n_tiles) % m_tiles;
    const I group = (item / (n_tiles * m_tiles)) % p.groups;
    const I sample = item / (n_tiles * m_tiles * p.groups);  // 0 unless per_sample
    const I m0 = m_tile * kIgemmBM, n0 = n_tile * kIgemmBN;
    const Weights wb = weights.for_sample(sample);

    // A[m, k] = x at output pixel m's tap k (0 outside the image): the thread's pixel is decoded once
    // per tile, and its k's digits kx, ky and c*H*W from k = row_k, then walked.
    const I am = m0 + th.row_m;
    const bool a_valid = am < M;
    const I a_img = sample + (a_valid ? am / pixels : 0), a_pix = a_valid ? am % pixels : 0;
    const I iy0 = (a_pix / p.out_w) * p.stride_h - p.pad_h;
    const I ix0 = (a_pix % p.out_w) * p.stride_w - p.pad_w;
    const T* x_group = x + (a_img * p.in_channels + group * cin_g) * p.in_h * p.in_w;
    I a_kx = th.row_k % p.kernel_w, a_ky = (th.row_k / p.kernel_w) % p.kernel_h, a_c = (th.row_k / taps) * in_pixels;
    auto a_next = [&](int, I k) -> T {  // k = (a_c / (H*W) * KH + a_ky) * KW + a_kx
      T v = zero;
      if (a_valid && k < K) {
        const I iy = iy0 + a_ky * p.dilation_h;
        const I ix = ix0 + a_kx * p.dilation_w;
        if (iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w) v = x_group[a_c + iy * p.in_w + ix];
      }
      a_kx += step_kx;  // k += kIgemmAStep
      a_ky += step_ky;
      a_c += step_c;
      if (igemm_carry(a_ky, a_kx, p.kernel_h, p.kernel_w)) a_c += in_pixels;
      return v;
    };
    // B[k, n] = w[g*Cout_g + n, k]: row col_row + 4i of the step at b_k0 is inside the GEMM iff
    // 4i < b_rows_left (one compare with a constant per row, instead of 16 row predicates kept live).
    const I b_rows_left = cout_g - n0 - th.col_row, b_e0 = group * cout_g * K + (n0 + th.col_row) * K + th.col_k;
    I b_k0 = 0;
    auto b_next = [&](int i) -> T {
      return (b_k0 + th.col_k < K && kIgemmColStep * i < b_rows_left)
                 ? wb.weight(b_e0 + b_k0 + i * (kIgemmColStep * K))
                 : zero;
    };

    IgemmAcc acc;
    igemm_mainloop<T, /*kPipelined=*/true, /*kARows=*/true, /*kPrefetchB=*/!Weights::per_sample>(
        acc, buf, th, I(0), K, [](I) {}, a_next, [&](I k0) { b_k0 = k0; }, b_next);

    // y[b, o, oy, ox] = from_acc<T>(acc + bias[o]) at its (possibly pixel-shuffled) position.
    const ConvOutLayout<I> out(p);
    igemm_epilogue(acc, th, m0, n0, M, cout_g, [&](I m) {
      const I img = sample + m / pixels, pix = m % pixels;
      T* y_pixel = y + img * out.image + out.pixel(pix / p.out_w, pix % p.out_w);
      return [&, y_pixel](I n, float v) {
        const I o = group * cout_g + n;
        if (wb.bias != nullptr) v += wb.bias_at(o);
        y_pixel[out.channel(o)] = from_acc<T>(v);
      };
    });
  }
}

// Each pass has two entry points (INDEX32): conv2d_igemm_* with 32-bit offsets, launched when the host
// proved p.index32 (it does nothing otherwise), and conv2d_igemm64_* with 64-bit offsets for any size.
template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 4)
conv2d_igemm_fwd(const Conv2dIgemmParams p, const T* __restrict__ x, const T* __restrict__ w,
                 const T* __restrict__ bias, T* __restrict__ y) {
  if (p.index32) igemm_fwd_body<T, IgemmWeights<T>, int>(p, x, IgemmWeights<T>{w, bias}, y);
}

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 3)
conv2d_igemm64_fwd(const Conv2dIgemmParams p, const T* __restrict__ x, const T* __restrict__ w,
                   const T* __restrict__ bias, T* __restrict__ y) {
  igemm_fwd_body<T, IgemmWeights<T>, index_t>(p, x, IgemmWeights<T>{w, bias}, y);
}

// dynamic_conv2d's forward: y[b] = conv(x[b], M_b) + sum_j att[b, j] * bias[j, :] (header: DYNAMIC).
template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 4)
conv2d_igemm_dynamic_fwd(const Conv2dIgemmParams p, const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ att, const T* __restrict__ bias, T* __restrict__ y) {
  const index_t bank = p.out_channels * (p.in_channels / p.groups) * p.kernel_h * p.kernel_w;
  if (p.index32)
    igemm_fwd_body<T, IgemmMixedWeights<T>, int>(
        p, x, IgemmMixedWeights<T>{w, att, bias, p.kernels, bank, p.out_channels}, y);
}

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 3)
conv2d_igemm64_dynamic_fwd(const Conv2dIgemmParams p, const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ att, const T* __restrict__ bias, T* __restrict__ y) {
  const index_t bank = p.out_channels * (p.in_channels / p.groups) * p.kernel_h * p.kernel_w;
  igemm_fwd_body<T, IgemmMixedWeights<T>, index_t>(
      p, x, IgemmMixedWeights<T>{w, att, bias, p.kernels, bank, p.out_channels}, y);
}

// dgrad's stride phase in one spatial dimension (stride S, padding P, dilation D, kernel
// size KS): phase r < S holds the input coordinates i = first + S*u, u < count, i.e. those
// with (i + P) % S == r, and exactly the taps kk = tap0 + tap_step*j, j < taps (those with
// kk*D % S == r) reach an output coordinate from them: (i + P - kk*D) is then a multiple
// of S, and the output coordinate is (i + P - kk*D) / S when that is in [0, Ho).
template <typename I>
struct IgemmPhase {
  I first, count, tap0, tap_step, taps;
  __device__ IgemmPhase(I r, I size, I stride, I pad, I kernel, I dilation) {
    first = ((r - pad) % stride + stride) % stride;
    count = first < size ? igemm_ceil_div<I>(size - first, stride) : 0;
    tap0 = 0;
    while (tap0 < kernel && (tap0 * dilation) % stride != r) ++tap0;
    I g = stride, d = dilation % stride;  // g = gcd(dilation, stride)
    while (d != 0) {
      const I t = g % d;
      g = d;
      d = t;
    }
    tap_step = stride / g;
    taps = tap0 < kernel ? igemm_ceil_div<I>(kernel - tap0, tap_step) : 0;
  }
};

// dgrad (GEMM mapping and phases in the header) for one weight source: conv2d_igemm_bwd_input
// (one GEMM per group and phase over the whole batch) and conv2d_igemm_dynamic_bwd_input (one per
// sample, group and phase). weights.bias: nullable, per INPUT channel (conv_transpose2d's forward).
template <typename T, typename Weights, typename I>
__device__ __forceinline__ void igemm_bwd_input_body(const Conv2dIgemmParams& params, const T* __restrict__ grad_y,
                                                     const Weights& weights, T* __restrict__ grad_x) {
  const IgemmDims<I> p(params);  // the shape in the index type I (INDEX32)
  const IgemmThread th;
  int buf = 0;  // igemm_mainloop's next staging buffer, kept across work items
  const I cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const I taps = p.kernel_h * p.kernel_w;
  const I pixels = p.in_h * p.in_w;
  const I phases = p.stride_h * p.stride_w;
  // per_sample: p.batch GEMMs of one image each; else one GEMM over the p.batch images
  const I samples = Weights::per_sample ? p.batch : 1, images = Weights::per_sample ? 1 : p.batch;
  // m tiles of the largest phase (ceil(H/SH) x ceil(W/SW) pixels per image); smaller phases skip the rest
  const I m_tiles = igemm_ceil_div<I>(images * igemm_ceil_div<I>(p.in_h, p.stride_h) * igemm_ceil_div<I>(p.in_w, p.stride_w), kIgemmBM);
  const I n_tiles = igemm_ceil_div<I>(cin_g, kIgemmBN);
  const I items = samples * p.groups * phases * m_tiles * n_tiles;
  const T zero = from_acc<T>(0.0f);

  for (I item = blockIdx.x; item < items; item += gridDim.x) {
    const I n_tile = item % n_tiles, m_tile = (item / n_tiles) % m_tiles;
    const I phase = (item / (n_tiles * m_tiles)) % phases;
    const I group = (item / (n_tiles * m_tiles * phases)) % p.groups;
    const I sample = item / (n_tiles * m_tiles * phases * p.groups);  // 0 unless per_sample
    const IgemmPhase<I> py(phase / p.stride_w, p.in_h, p.stride_h, p.pad_h, p.kernel_h, p.dilation_h);
    const IgemmPhase<I> px(phase % p.stride_w, p.in_w, p.stride_w, p.pad_w, p.kernel_w, p.dilation_w);
    const I phase_pixels = py.count * px.count, M = images * phase_pixels;
    const I phase_taps = py.taps * px.taps, K = cout_g * phase_taps;
    const I m0 = m_tile * kIgemmBM, n0 = n_tile * kIgemmBN;
    if (m0 >= M) continue;  // block-uniform: this phase has fewer pixels than the largest one
    const Weights wb = weights.for_sample(sample);

    // This thread's input pixel (in the phase), decoded once per tile.
    const I am = m0 + th.row_m;
    const bool a_valid = am < M;
    const I a_img = sample + (a_valid ? am / phase_pixels : 0), a_pix = a_valid ? am % phase_pixels : 0;
    // Folded for the k loop: with jy = j / nkx, jx = j % nkx the tap is (ky0 + sy*jy, kx0 + sx*jx);
    // iy + PH - ky0*DH and sy*DH are multiples of SH, so oy = (iy + PH - ky*DH) / SH = oy0 - jy*oy_step
    // exactly (no division per element; likewise ox), and the tap's weight offset is w_tap0 + jy*wy + jx*sx.
    const I nkx = px.taps, sx = px.tap_step;
    const I oy0 = (py.first + (a_pix / px.count) * p.stride_h + p.pad_h - py.tap0 * p.dilation_h) / p.stride_h;
    const I ox0 = (px.first + (a_pix % px.count) * p.stride_w + p.pad_w - px.tap0 * p.dilation_w) / p.stride_w;
    const I oy_step = py.tap_step * p.dilation_h / p.stride_h, ox_step = sx * p.dilation_w / p.stride_w;
    const I w_tap0 = py.tap0 * p.kernel_w + px.tap0, wy = py.tap_step * p.kernel_w;
    const ConvOutLayout<I> gy_at(p);  // gy may be pixel-shuffled (upscale > 1)
    const T* gy_image = grad_y + a_img * gy_at.image;
    const I gy_o0 = group * cout_g;
    const I w_group = group * cout_g * cin_g * taps;  // weight offset e of [Cout_g, Cin_g, KH, KW] of this group
    // No division per element or per step: both loaders walk k = (o*nky + jy)*nkx + jx in the mixed
    // radix (o, jy, jx) with constant step digits and compare-and-carry (each step digit is below its
    // radix: one carry per digit), decoded once per tile. The A gather adds kIgemmAStep per element
    // (its o then grows by at most 2: ConvOutLayout::advance), the B load kIgemmBK per step.
    // (A phase without a tap has K = 0 and runs no step: its radices are set to 1 to keep % defined.)
    const I nky = K > 0 ? py.taps : 1, nkx_r = K > 0 ? nkx : 1, ptaps = nky * nkx_r;
    const int a_sjx = int(kIgemmAStep % nkx_r), a_sjy = int((kIgemmAStep / nkx_r) % nky), a_so = int(kIgemmAStep / ptaps);
    const int b_sjx = int(kIgemmBK % nkx_r), b_sjy = int((kIgemmBK / nkx_r) % nky), b_so = int(kIgemmBK / ptaps);
    I a_jx = th.row_k % nkx_r, a_jy = (th.row_k / nkx_r) % nky;  // A's k = row_k, then + kIgemmAStep per element
    typename ConvOutLayout<I>::Walk a_ch = gy_at.walk(gy_o0 + th.row_k / ptaps);  // channel(g*Cout_g + o) of A's k
    I b_jx = th.col_k % nkx_r, b_jy = (th.col_k / nkx_r) % nky, b_o = th.col_k / ptaps;  // B's k = k0 + col_k
    // A's element at the walk's k (its (o, jy, jx) and channel offset), then the walk steps kIgemmAStep.
    auto a_gather_next = [&](I k) -> T {
      T v = zero;
      if (a_valid && k < K) {
        const I oy = oy0 - a_jy * oy_step, ox = ox0 - a_jx * ox_step;
        if (oy >= 0 && oy < p.out_h && ox >= 0 && ox < p.out_w) v = gy_image[a_ch.off + gy_at.pixel(oy, ox)];
      }
      int d_o = a_so;
      a_jx += a_sjx;
      a_jy += a_sjy;
      if (igemm_carry(a_jy, a_jx, nky, nkx_r)) ++d_o;
      gy_at.advance(a_ch, d_o);
      return v;
    };
    // The weight offset of B's k = (b_o * nky + b_jy) * nkx + b_jx for this step, then the walk steps kIgemmBK.
    auto b_offset_next = [&]() -> I {
      const I w_k = w_group + b_o * cin_g * taps + w_tap0 + b_jy * wy + b_jx * sx;
      b_o += b_so;
      b_jx += b_sjx;
      b_jy += b_sjy;
      if (igemm_carry(b_jy, b_jx, nky, nkx_r)) ++b_o;
      return w_k;
    };
    // B's element of tile row nn (transposed: w[g*Cout_g + o, n0 + nn, ky, kx]) for a step's k and offset.
    auto b_value = [&](int nn, bool k_valid, I w_k) -> T {
      const I n = n0 + nn;
      return (k_valid && n < cin_g) ? wb.weight(w_k + n * taps) : zero;
    };
    bool b_kv = false;  // the step's k = k0 + col_k is inside K
    I b_wk = 0;         // and its weight offset
    // igemm_mainloop's callables call the three loaders above rather than being them: with the loader
    // bodies written straight into the callables, NVRTC gives the 64-bit twins (no minimum blocks per
    // SM) 186-204 registers instead of 168, i.e. 2 blocks per SM instead of 3.
    IgemmAcc acc;
    igemm_mainloop<T, /*kPipelined=*/sizeof(I) == 4, /*kARows=*/true, /*kPrefetchB=*/!Weights::per_sample>(
        acc, buf, th, I(0), K, [](I) {}, [&](int, I k) { return a_gather_next(k); },
        [&](I k0) {
          b_kv = k0 + th.col_k < K;
          b_wk = b_offset_next();
        },
        [&](int i) { return b_value(th.col_row + kIgemmColStep * i, b_kv, b_wk); });

    // grad_x[b, g*Cin_g + n, iy, ix] = from_acc<T>(acc + bias[g*Cin_g + n]) (bias nullable) for the
    // phase pixel m (an empty K, no tap in this phase, writes zeros, or the bias).
    igemm_epilogue(acc, th, m0, n0, M, cin_g, [&](I m) {
      const I img = sample + m / phase_pixels, u = m % phase_pixels;
      const I pix = (py.first + (u / px.count) * p.stride_h) * p.in_w + px.first + (u % px.count) * p.stride_w;
      return [&, img, pix](I n, float v) {
        const I i = group * cin_g + n;
        if (wb.bias != nullptr) v += wb.bias_at(i);
        grad_x[(img * p.in_channels + i) * pixels + pix] = from_acc<T>(v);
      };
    });
  }
}

// Blocks per SM the 32-bit dgrad is compiled for (__launch_bounds__ minimum): 4 (<= 128 registers, 0
// spills) for fp16 / bf16; 3 for float / TF32, which spills 4-76 bytes at 128 (its 4 k8 slices per step).
template <typename T>
struct IgemmDgradBlocks {
  static constexpr int value = 4;
};
template <>
struct IgemmDgradBlocks<float> {
  static constexpr int value = 3;
};

// dgrad: grad_x = conv2d's input gradient of grad_y (+ bias[i] per input channel when non-null).
template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, IgemmDgradBlocks<T>::value)
conv2d_igemm_bwd_input(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                       const T* __restrict__ bias, T* __restrict__ grad_x) {
  if (p.index32) igemm_bwd_input_body<T, IgemmWeights<T>, int>(p, grad_y, IgemmWeights<T>{w, bias}, grad_x);
}

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads)
conv2d_igemm64_bwd_input(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                         const T* __restrict__ bias, T* __restrict__ grad_x) {
  igemm_bwd_input_body<T, IgemmWeights<T>, index_t>(p, grad_y, IgemmWeights<T>{w, bias}, grad_x);
}

// dynamic_conv2d's input gradient: grad_x[b] = conv's dgrad of grad_y[b] with M_b (header: DYNAMIC).
// No bias (the bias does not reach the input gradient).
template <typename T>
__global__ void __launch_bounds__(kIgemmThreads)
conv2d_igemm_dynamic_bwd_input(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                               const T* __restrict__ att, T* __restrict__ grad_x) {
  const index_t bank = p.out_channels * (p.in_channels / p.groups) * p.kernel_h * p.kernel_w;
  if (p.index32)
    igemm_bwd_input_body<T, IgemmMixedWeights<T>, int>(
        p, grad_y, IgemmMixedWeights<T>{w, att, nullptr, p.kernels, bank, p.out_channels}, grad_x);
}

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads)
conv2d_igemm64_dynamic_bwd_input(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                                 const T* __restrict__ att, T* __restrict__ grad_x) {
  const index_t bank = p.out_channels * (p.in_channels / p.groups) * p.kernel_h * p.kernel_w;
  igemm_bwd_input_body<T, IgemmMixedWeights<T>, index_t>(
      p, grad_y, IgemmMixedWeights<T>{w, att, nullptr, p.kernels, bank, p.out_channels}, grad_x);
}

// wgrad, split-K: workspace[s, o, n] = slice s's fp32 partial of grad_w[o, n] (n = (c*KH + ky)*KW + kx);
// conv2d_igemm_reduce_splits finishes it. GEMM mapping and split rule in the header.
template <typename T, typename I>
__device__ __forceinline__ void igemm_bwd_weight_body(const Conv2dIgemmParams& params, const T* __restrict__ grad_y,
                                                      const T* __restrict__ x, float* __restrict__ workspace) {
  const IgemmDims<I> p(params);  // the shape in the index type I (INDEX32)
  const IgemmThread th;
  int buf = 0;  // igemm_mainloop's next staging buffer, kept across work items
  const I cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const I taps = p.kernel_h * p.kernel_w, N = cin_g * taps;
  const I out_pixels = p.out_h * p.out_w, K = p.batch * out_pixels, in_pixels = p.in_h * p.in_w;
  const I slice = p.split_steps * kIgemmBK;
  const I m_tiles = igemm_ceil_div<I>(cout_g, kIgemmBM), n_tiles = igemm_ceil_div<I>(N, kIgemmBN);
  const I items = p.groups * p.splits * m_tiles * n_tiles;
  const int tid = threadIdx.x;
  const T zero = from_acc<T>(0.0f);
  // The loaders' row decodes, the same for every BK step of an item, are tabled in shared memory once
  // per item (thread tid < 64 fills B row tid, thread 64 + mm A row mm; divisions per item only):
  //   a_chan[mm] = channel(g*Cout_g + m0 + mm)   (gy's channel offset, pixel-shuffled or not)
  //   b_off[nn]  = c*H*W + (ky*DH)*W + kx*DW, b_dy[nn] = ky*DH, b_dx[nn] = kx*DW   for n = n0 + nn
  // (x at b*Cin*H*W + b_off + iy0*W + ix0, valid when 0 <= iy0 + b_dy < H and 0 <= ix0 + b_dx < W).
  // Rows past Cout_g / N get 0 and are never read. Race-free with one extra barrier per item: the
  // previous item's last table reads (its last step's gather) precede that step's __syncthreads, which
  // every thread has passed before it writes here, and these writes are seen after the __syncthreads
  // that follows them (before the item's first gather).
  static_assert(kIgemmThreads == kIgemmBM + kIgemmBN, "one table row per thread");
  __shared__ I a_chan[kIgemmBM], b_off[kIgemmBN], b_dy[kIgemmBN], b_dx[kIgemmBN];
  // The thread's pixel walk k = k_begin + col_k + kIgemmBK*s in the mixed radix (b, oy, ox): each step
  // adds the constant digits (kIgemmBK / (Ho*Wo), (kIgemmBK / Wo) % Ho, kIgemmBK % Wo) with
  // compare-and-carry (one per digit), decoded by division once per item. (An empty output image
  // has K = 0 and runs no step: its radices are set to 1 to keep % defined.)
  const I wo_r = out_pixels > 0 ? p.out_w : 1, ho_r = out_pixels > 0 ? p.out_h : 1;
  const I step_ox = kIgemmBK % wo_r, step_oy = (kIgemmBK / wo_r) % ho_r, step_img = kIgemmBK / (wo_r * ho_r);

  for (I item = blockIdx.x; item < items; item += gridDim.x) {
    const I n_tile = item % n_tiles, m_tile = (item / n_tiles) % m_tiles;
    const I split = (item / (n_tiles * m_tiles)) % p.splits;
    const I group = item / (n_tiles * m_tiles * p.splits);
    const I m0 = m_tile * kIgemmBM, n0 = n_tile * kIgemmBN;
    const I k_begin = split * slice, k_end = igemm_min<I>(K, k_begin + slice);
    const ConvOutLayout<I> gy_at(p);                  // gy may be pixel-shuffled (upscale > 1)
    const I gy_o0 = group * cout_g;               // gy at b*image + channel(gy_o0 + m) + pixel(oy, ox)
    const T* x_group = x + group * cin_g * in_pixels;  // + b*Cin*H*W + c*H*W + iy*W + ix
    if (tid < kIgemmBN) {
      const I n = n0 + tid;
      const I c = n < N ? n / taps : 0, tap = n < N ? n % taps : 0;
      const I dy = (tap / p.kernel_w) * p.dilation_h, dx = (tap % p.kernel_w) * p.dilation_w;
      b_off[tid] = c * in_pixels + dy * p.in_w + dx;
      b_dy[tid] = dy;
      b_dx[tid] = dx;
    } else {
      const I m = m0 + (tid - kIgemmBN);
      a_chan[tid - kIgemmBN] = m < cout_g ? gy_at.channel(gy_o0 + m) : 0;
    }
    __syncthreads();  // the tables are written before this item's first gather reads them
    const I k_first = k_begin + th.col_k;  // the walk's digits at the item's first k
    I w_img = k_first / (wo_r * ho_r), w_oy = (k_first / wo_r) % ho_r, w_ox = k_first % wo_r;

    // The step's pixel k = k0 + col_k = (w_img * Ho + w_oy) * Wo + w_ox, shared by both loaders; then
    // the walk steps kIgemmBK. Row i (mm = nn = col_row + 4i) is inside the GEMM iff 4i < rows_left:
    // one compare with a constant per row instead of 16 row predicates kept live across the steps.
    bool k_valid = false;
    I iy0 = 0, ix0 = 0, x_pix = 0, a_rows_left = 0, b_rows_left = 0;
    const T* gy_k = grad_y;
    const T* x_k = x_group;  // x_k[b_off[nn] + x_pix] = x at (c, iy0 + b_dy[nn], ix0 + b_dx[nn])
    auto begin = [&](I k0) {
      const I k = k0 + th.col_k;
      k_valid = k < k_end;
      const I img = k_valid ? w_img : 0, oy = k_valid ? w_oy : 0, ox = k_valid ? w_ox : 0;
      iy0 = oy * p.stride_h - p.pad_h;
      ix0 = ox * p.stride_w - p.pad_w;
      gy_k = grad_y + img * gy_at.image + gy_at.pixel(oy, ox);
      x_k = x_group + img * p.in_channels * in_pixels;
      x_pix = iy0 * p.in_w + ix0;
      w_img += step_img;  // k += kIgemmBK for the next step
      w_oy += step_oy;
      w_ox += step_ox;
      if (igemm_carry(w_oy, w_ox, ho_r, wo_r)) ++w_img;
      a_rows_left = cout_g - m0 - th.col_row;
      b_rows_left = N - n0 - th.col_row;
    };
    // A[m, k] = gy[b, g*Cout_g + m, oy, ox] of tile row mm = col_row + 4i.
    auto a_next = [&](int i, I) -> T {
      const int mm = th.col_row + kIgemmColStep * i;
      return (k_valid && kIgemmColStep * i < a_rows_left) ? gy_k[a_chan[mm]] : zero;
    };
    // B[k, n] = x at the pixel's tap n (0 outside the image) of tile row nn = col_row + 4i.
    auto b_next = [&](int i) -> T {
      const int nn = th.col_row + kIgemmColStep * i;
      T v = zero;
      if (k_valid && kIgemmColStep * i < b_rows_left) {
        const I iy = iy0 + b_dy[nn], ix = ix0 + b_dx[nn];
        if (iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w) v = x_k[b_off[nn] + x_pix];
      }
      return v;
    };

    IgemmAcc acc;
    igemm_mainloop<T, /*kPipelined=*/true, /*kARows=*/false, /*kPrefetchB=*/true>(acc, buf, th, k_begin, k_end, begin,
                                                                                 a_next, [](I) {}, b_next);

    // The whole partial tile (an empty K range writes zeros).
    float* ws = workspace + (split * p.out_channels + group * cout_g) * N;
    igemm_epilogue(acc, th, m0, n0, cout_g, N, [&](I m) { return [&, m](I n, float v) { ws[m * N + n] = v; }; });
  }
}

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 4)
conv2d_igemm_bwd_weight(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                        float* __restrict__ workspace) {
  if (p.index32) igemm_bwd_weight_body<T, int>(p, grad_y, x, workspace);  // else: launch conv2d_igemm64_bwd_weight
}

// The same for tensors past 2^31 elements (INDEX32: 64-bit offsets).
template <typename T>
__global__ void __launch_bounds__(kIgemmThreads, 3)
conv2d_igemm64_bwd_weight(const Conv2dIgemmParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                          float* __restrict__ workspace) {
  igemm_bwd_weight_body<T, index_t>(p, grad_y, x, workspace);
}

// grad_w[e] = from_acc<T>(sum over s = 0, 1, ..., S-1 of workspace[s, e]) for the
// Cout*Cin_g*KH*KW weights e: fixed slice order, one rounding. A block owns blockDim.x
// consecutive weights; one thread per weight (any block size, grid-stride).
template <typename T>
__global__ void conv2d_igemm_reduce_splits(const Conv2dIgemmParams p, const float* __restrict__ workspace,
                                           T* __restrict__ grad_w) {
  const index_t total = p.out_channels * (p.in_channels / p.groups) * p.kernel_h * p.kernel_w;
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    float sum = 0.0f;
    for (index_t s = 0; s < p.splits; ++s) sum += workspace[s * total + e];
    grad_w[e] = from_acc<T>(sum);
  }
}
