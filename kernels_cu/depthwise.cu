// depthwise: tiled depthwise 2-D convolution (conv2d with groups == in_channels),
// forward, input gradient and weight gradient, for small (3..7) and large (9..31,
// RepLKNet) kernels. conv2d's algorithm='depthwise' (cuconv/ops/depthwise.py) runs these;
// the general direct kernels (kernels_cu/conv2d.cu) remain for everything else.
// Design note, bandwidth/flop estimates and the GPU to-do list: docs/kernels/depthwise.md.
//
// Layout (contiguous NCHW; C = in_channels, M = multiplier = Cout / C, output channel o
// reads input channel o / M):
//   x  [B, C, H, W]   w [Cout, 1, KH, KW]   bias [Cout]   y [B, Cout, Ho, Wo]
//
// Forward:
//   y[b,o,oy,ox] = bias[o] + sum_{ky,kx} w[o,0,ky,kx] * x[b, o/M, oy*SH - PH + ky*DH, ox*SW - PW + kx*DW]
//   (terms outside the image are 0; PH, PW are the top/left padding)
// Gradients, gy = dL/dy:
//   dL/dx[b,c,iy,ix] = sum_{m<M, ky, kx} w[c*M+m,0,ky,kx] * gy[b, c*M+m, oy, ox]
//                      over the (ky,kx) with oy = (iy + PH - ky*DH)/SH an integer in [0, Ho)
//                      and ox = (ix + PW - kx*DW)/SW an integer in [0, Wo)      (a gather)
//   dL/dw[o,0,ky,kx] = sum_{b,oy,ox} gy[b,o,oy,ox] * x[b, o/M, oy*SH - PH + ky*DH, ox*SW - PW + kx*DW]
//   dL/dbias[o]      = sum_{b,oy,ox} gy[b,o,oy,ox]   (conv2d_bwd_bias of kernels_cu/conv2d.cu)
//
// Thread mapping (every tile lives in dynamic shared memory in the accumulator type,
// zero-filled where it falls outside the tensor, so the inner loops have no bounds tests):
//   depthwise_fwd: a block item is (plane b*Cout + o, a TH x TW tile of output pixels);
//     TH = p.tile_h, TW = p.tile_w (a multiple of R = DEPTHWISE_OUT_PER_THREAD). The block
//     stages the plane's KH*KW weights and the input halo tile of channel o/M,
//       halo_h = (TH-1)*SH + (KH-1)*DH + 1 rows  x  halo_w = (TW-1)*SW + (KW-1)*DW + 1 columns
//     (row pitch p.pitch >= halo_w, odd when possible: see the bank note below), loaded with
//     consecutive threads on consecutive columns (coalesced). Thread g (the host launches
//     blockDim >= TH*TW/R) then computes the R adjacent outputs g*R ... g*R + R-1 of the
//     tile (row-major) in registers. For SW = DW = 1 (the common case) the R inputs a tap
//     needs are a register window that slides one column per kx: one shared load per tap
//     feeds R FMAs (plus one broadcast weight load).
//   depthwise_bwd_input: the same over a TH x TW tile of INPUT pixels (plane b*C + c); for
//     each m < M the block stages w[c*M+m] and the gy halo tile of plane b*Cout + c*M+m.
//     Input row iy = iy0 + l (l < TH) takes gy row oy = (iy + PH - ky*DH)/SH, so the rows
//     the tile touches are oy_lo = ceil((iy0 + PH - (KH-1)*DH)/SH) ...
//     floor((iy0 + TH-1 + PH)/SH): at most ghalo_h = floor((TH-1 + (KH-1)*DH)/SH) + 1 rows
//     (write iy0 + PH - (KH-1)*DH = q*SH + rho, 0 <= rho < SH; the count is
//     floor((rho + L)/SH) + [rho == 0] <= floor(L/SH) + 1 with L = TH-1 + (KH-1)*DH), the
//     same for columns. In halo coordinates t = iy + PH - ky*DH - oy_lo*SH > -SH, and t is
//     a multiple of SH only when t >= 0, so the test t % SH == 0 (C++ keeps the sign) also
//     rejects the rows above the halo and the row is t / SH. Stride 1 is a correlation
//     with the flipped kernel (kx walked downwards: the forward's register window).
//   Output store (forward and input gradient): written straight from the registers, a
//     warp's lanes would be R elements apart. Instead, once every thread is done with the
//     halo, the threads put their sums into an output tile [TH][TW + 1] that overlays the
//     halo (the host sizes the region for the larger of the two), and the block writes
//     that tile out with consecutive threads on consecutive columns (coalesced). Only
//     where the sums go changes, never how they are computed.
//   depthwise_bwd_weight (stage 1): a block item is (o, chunk). The (b, output-row band of
//     TH rows) bands of the whole batch, bands = B * ceil(Ho/TH) in order, are cut into
//     p.chunks chunks of p.bands_per_chunk consecutive bands (both fixed by the shape).
//     For every TH x TW tile of a band the block stages the gy tile and the x halo tile (as
//     the forward); the block's threads are p.slices x p.tap_threads: thread
//     (slice s, slot j) owns the taps j + i*tap_threads (i < DEPTHWISE_TAPS_PER_THREAD,
//     plus further passes over the chunk when the kernel has more taps) and sums
//     gy * x over the tile pixels s, s + slices, ... in order. At the end of the chunk the
//     slices' partials meet in shared memory and slice 0 adds them in slice order into
//     the workspace ws[chunk, o, tap] (accumulator type).
//   depthwise_reduce_chunks (stage 2): one thread per (o, tap): grad_w = sum over chunks
//     in chunk order. No atomics anywhere: every sum has a fixed order that depends on the
//     shape only, so results are bitwise reproducible.
// Bank note: with R adjacent outputs per thread the lanes of a warp read words R apart in
// a row and tile rows SH*pitch apart; an odd SH*pitch puts the rows of one warp on
// different bank residues, so the fp32 window loads are conflict-free for TW = 32. The
// output tile's pitch TW + 1 is odd (TW is a multiple of R) for the same reason.
// Blocks walk their items with a grid-stride loop, so any grid size is valid. Offsets
// into global tensors are 64-bit; offsets inside a tile are 32-bit (tiles are bounded by
// the shared-memory budget).
#include "common/cuconv.cuh"
#include "common/conv_geometry.cuh"

// Adjacent outputs (along x) one thread computes: must match _OUT_PER_THREAD on the host.
constexpr int DEPTHWISE_OUT_PER_THREAD = 8;
// Taps one weight-gradient thread accumulates per pass: must match _TAPS_PER_THREAD.
constexpr int DEPTHWISE_TAPS_PER_THREAD = 4;

// One struct for all kernels; every field is a 64-bit integer so the host can pack it
// as a flat int64 array.
struct DepthwiseParams : ConvGeometryParams {
  long long multiplier;        // Cout / C
  long long tile_h, tile_w;    // pixels of the tile a block item covers (output, or input for bwd_input)
  long long halo_h, halo_w;    // the staged halo tile (x for fwd / bwd_weight, gy for bwd_input)
  long long pitch;             // shared-memory row pitch of the halo tile (>= halo_w)
  long long chunks;            // bwd_weight: chunks of the band range (workspace rows)
  long long bands_per_chunk;   // bwd_weight: (b, TH-row band) pairs per chunk
  long long tap_threads;       // bwd_weight: threads per slice (tap owners)
  long long slices;            // bwd_weight: pixel slices (tap_threads * slices <= blockDim.x)
};

// The filter window as 32-bit values (the host bounds them) and the shared-memory pitch
// of the staged halo tile: what every tile kernel starts from.
struct DepthwiseWindow {
  int kh, kw, taps, sh, sw, dh, dw;
  unsigned pitch;
  __device__ static DepthwiseWindow of(const DepthwiseParams& p) {
    const int kh = int(p.kernel_h), kw = int(p.kernel_w);
    return {kh, kw, kh * kw, int(p.stride_h), int(p.stride_w), int(p.dilation_h), int(p.dilation_w), unsigned(p.pitch)};
  }
};

// floor(a / b) for b > 0 and any sign of a.
__device__ __forceinline__ index_t floor_div(index_t a, index_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Stages an h x w window of one plane (top-left at (row0, col0), possibly outside the
// plane) into tile[r * pitch + c] in the accumulator type, zero outside the plane.
// Consecutive threads take consecutive columns: coalesced global loads.
template <typename T, typename Acc>
__device__ __forceinline__ void stage_window(Acc* tile, const T* __restrict__ plane, index_t rows, index_t cols,
                                             index_t row0, index_t col0, unsigned h, unsigned w, unsigned pitch) {
  for (unsigned e = threadIdx.x; e < h * w; e += blockDim.x) {
    const unsigned r = e / w, c = e % w;
    const index_t gr = row0 + r, gc = col0 + c;
    tile[r * pitch + c] = (gr >= 0 && gr < rows && gc >= 0 && gc < cols) ? to_acc(plane[gr * cols + gc]) : Acc(0);
  }
}

// The inverse of stage_window: writes tile[r * pitch + c] (r < h, c < w) to the plane at
// (row0 + r, col0 + c), skipping what falls outside it. Consecutive threads take
// consecutive columns: coalesced global stores, whatever the per-thread register tile.
template <typename T, typename Acc>
__device__ __forceinline__ void store_window(T* __restrict__ plane, index_t rows, index_t cols, index_t row0,
                                             index_t col0, const Acc* tile, unsigned h, unsigned w, unsigned pitch) {
  for (unsigned e = threadIdx.x; e < h * w; e += blockDim.x) {
    const unsigned r = e / w, c = e % w;
    const index_t gr = row0 + r, gc = col0 + c;
    if (gr < rows && gc < cols) plane[gr * cols + gc] = from_acc<T>(tile[r * pitch + c]);
  }
}

// acc[r] += sum_k wrow[k * wstep] * row[r + k] for k < n: one tile row of a stride-1,
// dilation-1 correlation as a register window that slides one column per tap.
template <typename Acc, int R>
__device__ __forceinline__ void window_row(Acc (&acc)[R], const Acc* row, const Acc* wrow, int wstep, int n) {
  Acc v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = row[r];
  for (int k = 0; k < n; ++k) {
    const Acc wv = wrow[k * wstep];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] += wv * v[r];
    if (k + 1 < n) {  // never reads past the halo row
#pragma unroll
      for (int r = 0; r + 1 < R; ++r) v[r] = v[r + 1];
      v[R - 1] = row[k + R];
    }
  }
}

// Puts each active thread's R adjacent outputs (tile row ly, columns lx ...) into the
// tile[TH][pitch] that store_window then writes out row by row. The tile overlays the
// halo (the host sizes the region for both), hence the barrier before. pitch = TW + 1 is
// odd, so a warp's lanes (R words apart in a row, rows pitch apart) hit distinct banks
// for TW = 32 in fp32.
template <typename Acc, int R>
__device__ __forceinline__ void stage_outputs(Acc* tile, unsigned pitch, unsigned ly, unsigned lx, bool active,
                                              const Acc (&acc)[R]) {
  __syncthreads();  // every thread is done reading the halo
  if (active) {
#pragma unroll
    for (int r = 0; r < R; ++r) tile[ly * pitch + lx + r] = acc[r];
  }
  __syncthreads();
}

template <typename T>
__global__ void depthwise_fwd(const DepthwiseParams p, const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ bias, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = DEPTHWISE_OUT_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, smem);
  const auto [kh, kw, taps, sh, sw, dh, dw, pitch] = DepthwiseWindow::of(p);
  Acc* wsm = smem;          // [taps]
  Acc* halo = smem + taps;  // [halo_h][pitch]; after the sums, the output tile [tile_h][tile_w + 1]
  const index_t tiles_x = ceil_div(p.out_w, p.tile_w), tiles = ceil_div(p.out_h, p.tile_h) * tiles_x;
  const index_t items = p.batch * p.out_channels * tiles;
  const unsigned per_row = unsigned(p.tile_w) / R, groups = unsigned(p.tile_h) * per_row;
  const bool window = sw == 1 && dw == 1;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*Cout + o
    const index_t o = plane % p.out_channels, b = plane / p.out_channels;
    const index_t oy0 = (tile / tiles_x) * p.tile_h, ox0 = (tile % tiles_x) * p.tile_w;
    const T* xc = x + (b * p.in_channels + o / p.multiplier) * p.in_h * p.in_w;
    __syncthreads();  // every thread is done with the previous item's tiles
    for (int k = threadIdx.x; k < taps; k += blockDim.x) wsm[k] = to_acc(w[o * taps + k]);
    stage_window(halo, xc, p.in_h, p.in_w, oy0 * sh - p.pad_h, ox0 * sw - p.pad_w, unsigned(p.halo_h),
                 unsigned(p.halo_w), pitch);
    __syncthreads();
    const Acc bias_o = bias != nullptr ? to_acc(bias[o]) : Acc(0);
    // one group of R outputs per thread (the host launches blockDim >= groups): its sums
    // stay in registers across the barriers of the output staging below
    const unsigned g = threadIdx.x;
    const unsigned ly = g / per_row, lx = (g % per_row) * R;
    const bool active = g < groups && oy0 + ly < p.out_h && ox0 + lx < p.out_w;
    Acc acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = bias_o;
    if (active) {
      const Acc* base = halo + ly * unsigned(sh) * pitch + lx * unsigned(sw);
      for (int ky = 0; ky < kh; ++ky) {
        const Acc* row = base + unsigned(ky * dh) * pitch;
        const Acc* wrow = wsm + ky * kw;
        if (window) {
          window_row<Acc, R>(acc, row, wrow, 1, kw);
        } else {
          for (int kx = 0; kx < kw; ++kx) {
            const Acc wv = wrow[kx];
            const Acc* q = row + kx * dw;
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] += wv * q[r * sw];
          }
        }
      }
    }
    stage_outputs<Acc, R>(halo, unsigned(p.tile_w) + 1, ly, lx, active, acc);
    store_window(y + plane * p.out_h * p.out_w, p.out_h, p.out_w, oy0, ox0, halo, unsigned(p.tile_h),
                 unsigned(p.tile_w), unsigned(p.tile_w) + 1);
  }
}

template <typename T>
__global__ void depthwise_bwd_input(const DepthwiseParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                                    T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = DEPTHWISE_OUT_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, smem);
  const auto [kh, kw, taps, sh, sw, dh, dw, pitch] = DepthwiseWindow::of(p);
  Acc* wsm = smem;          // [taps]
  Acc* halo = smem + taps;  // gy halo [halo_h][pitch]; after the sums, the output tile [tile_h][tile_w + 1]
  const index_t tiles_x = ceil_div(p.in_w, p.tile_w), tiles = ceil_div(p.in_h, p.tile_h) * tiles_x;
  const index_t items = p.batch * p.in_channels * tiles;
  const unsigned per_row = unsigned(p.tile_w) / R, groups = unsigned(p.tile_h) * per_row;
  const bool window = sh == 1 && sw == 1 && dh == 1 && dw == 1;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*C + c
    const index_t c = plane % p.in_channels, b = plane / p.in_channels;
    const index_t iy0 = (tile / tiles_x) * p.tile_h, ix0 = (tile % tiles_x) * p.tile_w;
    // first gy row / column the tile can touch (see the header): halo coordinate 0
    const index_t oy_lo = -floor_div(-(iy0 + p.pad_h - (p.kernel_h - 1) * p.dilation_h), p.stride_h);
    const index_t ox_lo = -floor_div(-(ix0 + p.pad_w - (p.kernel_w - 1) * p.dilation_w), p.stride_w);
    // halo coordinate (times the stride) of tap (0, 0) for local pixel (0, 0); the t and u
    // below are > -stride, and a multiple of the stride only when >= 0 (C++ % keeps the sign)
    const int ty0 = int(iy0 + p.pad_h - oy_lo * p.stride_h), tx0 = int(ix0 + p.pad_w - ox_lo * p.stride_w);
    // The sums run across the M staged tiles, so each thread keeps ONE group of R inputs
    // in registers for the whole item: the host launches blockDim >= groups.
    const unsigned g = threadIdx.x;
    const unsigned ly = g / per_row, lx = (g % per_row) * R;
    const bool active = g < groups && iy0 + ly < p.in_h && ix0 + lx < p.in_w;
    Acc sum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sum[r] = Acc(0);
    for (index_t m = 0; m < p.multiplier; ++m) {
      const index_t o = c * p.multiplier + m;
      __syncthreads();  // every thread is done with the previous tiles
      for (int k = threadIdx.x; k < taps; k += blockDim.x) wsm[k] = to_acc(w[o * taps + k]);
      stage_window(halo, grad_y + (b * p.out_channels + o) * p.out_h * p.out_w, p.out_h, p.out_w, oy_lo, ox_lo,
                   unsigned(p.halo_h), unsigned(p.halo_w), pitch);
      __syncthreads();
      if (!active) continue;
      for (int ky = 0; ky < kh; ++ky) {
        const int t = ty0 + int(ly) - ky * dh;  // halo row * SH
        if (t % sh != 0) continue;
        const Acc* row = halo + unsigned(t / sh) * pitch;
        if (window) {
          // stride 1: correlation with the flipped row, kx = KW-1 ... 0 walks the halo upwards
          window_row<Acc, R>(sum, row + (tx0 + int(lx) - (kw - 1)), wsm + ky * kw + (kw - 1), -1, kw);
        } else {
          for (int kx = 0; kx < kw; ++kx) {
            const Acc wv = wsm[ky * kw + kx];
            const int u = tx0 + int(lx) - kx * dw;  // halo column * SW for r = 0
#pragma unroll
            for (int r = 0; r < R; ++r)
              if ((u + r) % sw == 0) sum[r] += wv * row[(u + r) / sw];
          }
        }
      }
    }
    stage_outputs<Acc, R>(halo, unsigned(p.tile_w) + 1, ly, lx, active, sum);
    store_window(grad_x + plane * p.in_h * p.in_w, p.in_h, p.in_w, iy0, ix0, halo, unsigned(p.tile_h),
                 unsigned(p.tile_w), unsigned(p.tile_w) + 1);
  }
}

template <typename T>
__global__ void depthwise_bwd_weight(const DepthwiseParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                                     typename Accumulator<T>::type* __restrict__ ws) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int J = DEPTHWISE_TAPS_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, smem);
  const auto [kh, kw, taps, sh, sw, dh, dw, pitch] = DepthwiseWindow::of(p);
  const unsigned tw = unsigned(p.tile_w);
  const unsigned tap_threads = unsigned(p.tap_threads), slices = unsigned(p.slices);
  const unsigned gy_entries = unsigned(p.tile_h) * tw;
  Acc* gys = smem;                                             // [tile_h][tile_w]
  Acc* xs = smem + gy_entries;                                 // [halo_h][pitch]
  Acc* partial = xs + unsigned(p.halo_h) * pitch;              // [slices][tap_threads][J]
  const index_t tiles_y = ceil_div(p.out_h, p.tile_h), tiles_x = ceil_div(p.out_w, p.tile_w);
  const index_t bands = p.batch * tiles_y;
  const index_t items = p.out_channels * p.chunks;
  const unsigned slot = threadIdx.x % tap_threads, slice = threadIdx.x / tap_threads;
  const bool owner = slice < slices;  // threads past slices * tap_threads only help stage
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t chunk = item % p.chunks, o = item / p.chunks;
    const index_t band_lo = chunk * p.bands_per_chunk, band_hi = min_index(bands, band_lo + p.bands_per_chunk);
    for (int pass = 0; pass < taps; pass += int(tap_threads) * J) {
      // the taps this thread owns in this pass, as offsets into the x halo tile
      unsigned offset[J];
      bool has[J];
      Acc acc[J];
#pragma unroll
      for (int i = 0; i < J; ++i) {
        const int t = pass + int(slot) + i * int(tap_threads);
        has[i] = owner && t < taps;
        offset[i] = has[i] ? unsigned((t / kw) * dh) * pitch + unsigned((t % kw) * dw) : 0u;
        acc[i] = Acc(0);
      }
      for (index_t band = band_lo; band < band_hi; ++band) {
        const index_t b = band / tiles_y, oy0 = (band % tiles_y) * p.tile_h;
        const unsigned nr = unsigned(min_index(p.tile_h, p.out_h - oy0));
        const T* gp = grad_y + (b * p.out_channels + o) * p.out_h * p.out_w;
        const T* xp = x + (b * p.in_channels + o / p.multiplier) * p.in_h * p.in_w;
        for (index_t tx = 0; tx < tiles_x; ++tx) {
          const index_t ox0 = tx * p.tile_w;
          const unsigned nc = unsigned(min_index(p.tile_w, p.out_w - ox0));
          __syncthreads();  // every thread is done with the previous tiles
          stage_window(gys, gp, p.out_h, p.out_w, oy0, ox0, nr, nc, tw);
          stage_window(xs, xp, p.in_h, p.in_w, oy0 * sh - p.pad_h, ox0 * sw - p.pad_w, unsigned(p.halo_h),
                       unsigned(p.halo_w), pitch);
          __syncthreads();
          if (!owner) continue;
          for (unsigned q = slice; q < nr * nc; q += slices) {
            const unsigned pr = q / nc, pc = q % nc;
            const Acc g = gys[pr * tw + pc];
            const Acc* xq = xs + pr * unsigned(sh) * pitch + pc * unsigned(sw);
#pragma unroll
            for (int i = 0; i < J; ++i)
              if (has[i]) acc[i] += g * xq[offset[i]];
          }
        }
      }
      // the slices' partials, added in slice order by slice 0
      __syncthreads();
      if (owner) {
#pragma unroll
        for (int i = 0; i < J; ++i) partial[(slice * tap_threads + slot) * J + i] = acc[i];
      }
      __syncthreads();
      if (owner && slice == 0) {
#pragma unroll
        for (int i = 0; i < J; ++i) {
          if (!has[i]) continue;
          Acc total = acc[i];
          for (unsigned s = 1; s < slices; ++s) total += partial[(s * tap_threads + slot) * J + i];
          const int t = pass + int(slot) + i * int(tap_threads);
          ws[(chunk * p.out_channels + o) * taps + t] = total;
        }
      }
    }
  }
}

// grad_w[e] = sum_{chunk < chunks} ws[chunk, e] in chunk order, e = o*taps + tap.
template <typename T>
__global__ void depthwise_reduce_chunks(const DepthwiseParams p, const typename Accumulator<T>::type* __restrict__ ws,
                                        T* __restrict__ grad_w) {
  typedef typename Accumulator<T>::type Acc;
  const index_t n = p.out_channels * p.kernel_h * p.kernel_w;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n; e += index_t(gridDim.x) * blockDim.x) {
    Acc total = Acc(0);
    for (index_t chunk = 0; chunk < p.chunks; ++chunk) total += ws[chunk * n + e];
    grad_w[e] = from_acc<T>(total);
  }
}
