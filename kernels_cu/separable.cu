// separable: depthwise-separable and spatial-separable convolutions, each forward as
// ONE fused kernel whose intermediate stays in shared memory (never written to device
// memory). The backward passes are composed on the host from conv2d's kernels
// (kernels_cu/conv2d.cu), see "Gradients" below.
//
// ---- depthwise_separable_conv2d_fwd ------------------------------------------------
// Layout (contiguous NCHW; C = in_channels, M = mid_channels = C*m, m = M / groups with
// groups = C, so mid channel k reads input channel k / m):
//   x  [B, C, H, W]     dw [M, 1, KH, KW]   dw_bias [M]
//   pw [Cout, M, 1, 1]  pw_bias [Cout]      y [B, Cout, Ho, Wo]
// Forward (torch: conv2d(conv2d(x, dw, dw_bias, s, p, d, groups=C), pw, pw_bias)):
//   mid[b,k,oy,ox] = dw_bias[k] + sum_{ky,kx} dw[k,0,ky,kx] * x[b, k/m, oy*SH - PH + ky*DH, ox*SW - PW + kx*DW]
//   y[b,o,oy,ox]   = pw_bias[o] + sum_{k<M} pw[o,k] * mid[b,k,oy,ox]
//   (terms whose input position falls in the padding are 0)
// Thread mapping: a block owns (b, a tile of p.tile consecutive output pixels of the
//   flattened Ho*Wo plane). Phase 1: the block's threads stride over the M x tile
//   depthwise outputs (consecutive threads -> consecutive pixels) and write them, in
//   the accumulator type, to dynamic shared memory mid[k * tile + q]. __syncthreads.
//   Phase 2: the threads stride over ceil(Cout/OUT_PER_THREAD) x tile items; each item
//   is OUT_PER_THREAD output channels at one pixel, so every shared-memory read of
//   mid[k, q] feeds OUT_PER_THREAD FMAs (pw rows are warp-uniform reads, cached).
// Shared memory: M * tile * sizeof(Acc) bytes. The host picks tile = min(128, budget /
//   (M * sizeof(Acc))) pixels, rounded down to whole warps (or the whole plane when it
//   fits), budget = min(48 KiB, the device's per-block limit); when even tile = 1 does
//   not fit (M > 12288 in fp32, 6144 in fp64), the host runs the unfused composition.
//
// ---- spatial_separable_conv2d_fwd --------------------------------------------------
// Layout (G = groups, Cin_g = Cin/G, Cmid_g = Cmid/G, Cout_g = Cout/G):
//   x  [B, Cin, H, W]   wv [Cmid, Cin_g, KH, 1]   wh [Cout, Cmid_g, 1, KW]   bias [Cout]
//   y  [B, Cout, Ho, Wo]
// Forward (torch: conv2d(conv2d(x, wv, None, (SH,1), (PH,0), (DH,1), G), wh, bias, (1,SW), (0,PW), (1,DW), G)),
// for mid channel c in group g = c / Cmid_g and output channel o in group g = o / Cout_g:
//   mid[b,c,oy,mx] = sum_{ci<Cin_g, ky} wv[c,ci,ky,0] * x[b, g*Cin_g + ci, oy*SH - PH + ky*DH, mx]   (mx < W)
//   y[b,o,oy,ox]   = bias[o] + sum_{c<Cmid_g, kx} wh[o,c,0,kx] * mid[b, g*Cmid_g + c, oy, ox*SW - PW + kx*DW]
// Thread mapping: a block owns (b, g, oy, a tile of p.tile consecutive output columns
//   ox0 ...). The tile reads the mid columns col0 = ox0*SW - PW ... col0 + span - 1 with
//   span = (tile-1)*SW + (KW-1)*DW + 1 (p.span, for a full tile). Phase 1: the threads
//   stride over the Cmid_g x span entries of mid[g's channels, oy, those columns]
//   (consecutive threads -> consecutive columns: coalesced reads of x rows) into dynamic
//   shared memory mid[c * span + s]; columns outside [0, W) are stage 2's zero padding
//   and are skipped (neither computed nor read). __syncthreads. Phase 2: the threads
//   stride over ceil(Cout_g/OUT_PER_THREAD) x tile items, OUT_PER_THREAD output channels
//   of the group at one column each. A mid row feeds only its own output row, so the
//   only recomputation is the horizontal halo ((KW-1)*DW + 1 - SW columns) between
//   column tiles of one row; the host makes tiles as wide as the budget allows.
// Shared memory: Cmid_g * span * sizeof(Acc) bytes, within the same budget; when even a
//   one-column tile does not fit, the host runs the unfused composition.
//
// ---- Gradients (composed on the host from conv2d's kernels) ------------------------
// With gy = dL/dy, both ops recompute the intermediate mid with one conv2d forward
// (the pointwise / horizontal weight gradient needs its values) and then chain conv2d's
// hand-written backward:
//   gmid, d pw (wh), d pw_bias (bias) = conv2d_backward(gy, mid, second-stage weights)
//       dL/dmid[b,k,p]  = sum_o pw[o,k] gy[b,o,p]          (depthwise-separable)
//       dL/dpw[o,k]     = sum_{b,p} gy[b,o,p] mid[b,k,p]
//       dL/dmid[b,c,oy,mx] = sum_{o in c's group g, kx : ox*SW - PW + kx*DW = mx}
//                                wh[o, c - g*Cmid_g, 0, kx] gy[b,o,oy,ox]
//       dL/dwh[o,c,0,kx]   = sum_{b,oy,ox} gy[b,o,oy,ox] mid[b, g*Cmid_g + c, oy, ox*SW - PW + kx*DW]
//       dL/dbias[o]     = sum_{b,oy,ox} gy[b,o,oy,ox]
//   dx, d dw (wv), d dw_bias = conv2d_backward(gmid, x, first-stage weights)
//       dL/dx[b,i,iy,ix] = sum_{k with k/m = i, ky, kx} dL/dmid[b,k,oy,ox] dw[k,0,ky,kx]   (gather)
//       dL/ddw[k,0,ky,kx] = sum_{b,oy,ox} dL/dmid[b,k,oy,ox] x[b, k/m, iy, ix],  dL/ddw_bias[k] = sum dL/dmid[b,k,..]
//       (spatial: the same with the (KH x 1) kernel wv and groups G)
// Every step is a gather or a fixed-order block reduction: deterministic.
#include "common/cuconv.cuh"

// Output channels one phase-2 item computes: each mid value read from shared memory
// feeds this many FMAs.
constexpr int SEPARABLE_OUT_PER_THREAD = 4;

// One struct for both kernels (a module has one params struct); every field is a 64-bit
// integer so the host can pack it as a flat int64 array.
struct SeparableParams {
  long long batch, in_channels, in_h, in_w;
  long long mid_channels, out_channels, out_h, out_w;  // out_h is also mid's height
  long long kernel_h, kernel_w;  // depthwise: the dw filter; spatial: KH of wv, KW of wh
  long long stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;  // pad: top, left
  long long groups;  // depthwise: in_channels; spatial: the op's groups
  long long tile;    // depthwise: output pixels per block item; spatial: output columns
  long long span;    // spatial: mid columns a full tile reads ((tile-1)*SW + (KW-1)*DW + 1); depthwise: unused
};

// The taps t in [lo, hi) of a dilated filter whose input position first + t*dilation
// lies inside [0, size): always one contiguous range, so the tap loops need no bounds
// test (terms in the padding are skipped, i.e. zero).
struct TapRange {
  index_t lo, hi;
  __device__ TapRange(index_t first, index_t dilation, index_t size, index_t taps) {
    lo = first >= 0 ? 0 : ceil_div(-first, dilation);
    hi = first < size ? min_index(taps, ceil_div(size - first, dilation)) : 0;
  }
};

// Block-local loop indices (shared-memory entries, phase-2 items of one block item) are
// 32-bit: the host bounds them below 2**31. Offsets into global tensors are 64-bit.

template <typename T>
__global__ void depthwise_separable_conv2d_fwd(const SeparableParams p, const T* __restrict__ x,
                                               const T* __restrict__ dw, const T* __restrict__ dw_bias,
                                               const T* __restrict__ pw, const T* __restrict__ pw_bias,
                                               T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = SEPARABLE_OUT_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, mid);  // [mid_channels][tile]
  const index_t multiplier = p.mid_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, in_plane = p.in_h * p.in_w;
  const index_t pixels = p.out_h * p.out_w, tiles = ceil_div(pixels, p.tile);
  const unsigned tile = unsigned(p.tile), mid_channels = unsigned(p.mid_channels);
  const unsigned out_groups = unsigned(ceil_div(p.out_channels, R));
  const index_t items = p.batch * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t b = item / tiles, pix0 = (item % tiles) * p.tile;
    const unsigned n = unsigned(min_index(p.tile, pixels - pix0));  // pixels in this (possibly short) tile
    __syncthreads();  // every thread is done reading the previous item's mid
    // Phase 1: the depthwise outputs of all M channels at the tile's pixels.
    for (unsigned e = threadIdx.x; e < mid_channels * n; e += blockDim.x) {
      const unsigned k = e / n, q = e % n;
      const index_t oy = (pix0 + q) / p.out_w, ox = (pix0 + q) % p.out_w;
      const index_t iy0 = oy * p.stride_h - p.pad_h, ix0 = ox * p.stride_w - p.pad_w;  // tap (0, 0)
      const TapRange ky(iy0, p.dilation_h, p.in_h, p.kernel_h), kx(ix0, p.dilation_w, p.in_w, p.kernel_w);
      const T* xc = x + (b * p.in_channels + k / multiplier) * in_plane;
      const T* wk = dw + k * taps;
      Acc acc = dw_bias != nullptr ? to_acc(dw_bias[k]) : Acc(0);
      for (index_t i = ky.lo; i < ky.hi; ++i) {
        const index_t row = (iy0 + i * p.dilation_h) * p.in_w + ix0;  // row + j*DW >= 0 for j in the range
        for (index_t j = kx.lo; j < kx.hi; ++j)
          acc += to_acc(wk[i * p.kernel_w + j]) * to_acc(xc[row + j * p.dilation_w]);
      }
      mid[k * tile + q] = acc;
    }
    __syncthreads();
    // Phase 2: the pointwise 1x1 over the on-chip intermediate.
    for (unsigned e = threadIdx.x; e < out_groups * n; e += blockDim.x) {
      const index_t o0 = index_t(e / n) * R;
      const unsigned q = e % n;
      const T* rows[R];
      Acc acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const index_t o = min_index(o0 + r, p.out_channels - 1);  // past the end: a duplicate, not stored
        rows[r] = pw + o * p.mid_channels;
        acc[r] = pw_bias != nullptr ? to_acc(pw_bias[o]) : Acc(0);
      }
      for (unsigned k = 0; k < mid_channels; ++k) {
        const Acc v = mid[k * tile + q];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += to_acc(rows[r][k]) * v;
      }
      T* out = y + (b * p.out_channels + o0) * pixels + pix0 + q;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (o0 + r < p.out_channels) out[r * pixels] = from_acc<T>(acc[r]);
    }
  }
}

template <typename T>
__global__ void spatial_separable_conv2d_fwd(const SeparableParams p, const T* __restrict__ x,
                                             const T* __restrict__ wv, const T* __restrict__ wh,
                                             const T* __restrict__ bias, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = SEPARABLE_OUT_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, mid);  // [Cmid_g][span]
  const index_t cin_g = p.in_channels / p.groups, cmid_g = p.mid_channels / p.groups;
  const index_t cout_g = p.out_channels / p.groups, in_plane = p.in_h * p.in_w;
  const index_t tiles = ceil_div(p.out_w, p.tile);
  const unsigned out_groups = unsigned(ceil_div(cout_g, R)), span_full = unsigned(p.span);
  const index_t items = p.batch * p.groups * p.out_h * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t ox0 = (item % tiles) * p.tile, oy = (item / tiles) % p.out_h;
    const index_t g = (item / (tiles * p.out_h)) % p.groups, b = item / (tiles * p.out_h * p.groups);
    const unsigned n = unsigned(min_index(p.tile, p.out_w - ox0));  // output columns in this tile
    const index_t col0 = ox0 * p.stride_w - p.pad_w;                 // first mid column the tile reads
    const unsigned span = unsigned((n - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1);
    const index_t iy0 = oy * p.stride_h - p.pad_h;  // input row of tap 0
    const TapRange ky(iy0, p.dilation_h, p.in_h, p.kernel_h);
    __syncthreads();  // every thread is done reading the previous item's mid
    // Phase 1: the vertical (KH x 1) conv for the group's Cmid_g channels at row oy.
    const T* x_group = x + (b * p.in_channels + g * cin_g) * in_plane;
    for (unsigned e = threadIdx.x; e < unsigned(cmid_g) * span; e += blockDim.x) {
      const unsigned c = e / span, s = e % span;
      if (col0 + s < 0 || col0 + s >= p.in_w) continue;  // stage 2's zero padding: never read
      const T* wc = wv + (g * cmid_g + c) * cin_g * p.kernel_h;
      const T* xc = x_group + col0 + s;  // column mx = col0 + s of the group's first channel
      Acc acc = Acc(0);
      for (index_t ci = 0; ci < cin_g; ++ci, wc += p.kernel_h, xc += in_plane)
        for (index_t i = ky.lo; i < ky.hi; ++i) acc += to_acc(wc[i]) * to_acc(xc[(iy0 + i * p.dilation_h) * p.in_w]);
      mid[c * span_full + s] = acc;
    }
    __syncthreads();
    // Phase 2: the horizontal (1 x KW) conv of the on-chip row for the group's outputs.
    for (unsigned e = threadIdx.x; e < out_groups * n; e += blockDim.x) {
      const index_t o0 = index_t(e / n) * R;
      const unsigned q = e % n;
      const TapRange kx(col0 + index_t(q) * p.stride_w, p.dilation_w, p.in_w, p.kernel_w);
      const Acc* m = mid + q * unsigned(p.stride_w);
      const T* rows[R];
      Acc acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const index_t o = g * cout_g + min_index(o0 + r, cout_g - 1);  // past the group's end: not stored
        rows[r] = wh + o * cmid_g * p.kernel_w;
        acc[r] = bias != nullptr ? to_acc(bias[o]) : Acc(0);
      }
      for (index_t c = 0; c < cmid_g; ++c, m += span_full) {
        for (index_t j = kx.lo; j < kx.hi; ++j) {
          const Acc v = m[j * p.dilation_w];
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += to_acc(rows[r][j]) * v;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) rows[r] += p.kernel_w;
      }
      T* out = y + ((b * p.out_channels + g * cout_g + o0) * p.out_h + oy) * p.out_w + ox0 + q;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (o0 + r < cout_g) out[r * p.out_h * p.out_w] = from_acc<T>(acc[r]);
    }
  }
}
