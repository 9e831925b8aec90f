// dynamic_conv: convolutions whose kernel is a per-sample mixture of shared parameters,
// forward and every gradient, with the per-sample kernel aggregated ON CHIP (never a
// [B, Cout, Cin/G, KH, KW] tensor in device memory). One kernel family serves:
//   dynamic_conv2d (CondConv, DY-CNN)   the one-slot warehouse (S = 1) plus a bias mixture
//   odconv2d (ODConv)                   the one-slot warehouse with the spatial (sa), input
//                                       channel (ca) and filter (fa) attentions
//   warehouse_conv2d (KernelWarehouse)  the general case, no sa/ca/fa/bias
//
// Layout (contiguous NCHW; G = groups, Cin_g = Cin/G, Cout_g = Cout/G, taps = KH*KW):
//   x     [B, Cin, H, W]                 y, gy [B, Cout, Ho, Wo]
//   cells [n, co, ci, ckh, ckw]          the shared parameters (dynamic/ODConv: the K
//                                        kernels [K, Cout, Cin_g, KH, KW], co = Cout, ...)
//   att   [B, S, n]                      S = (Cout/co)(Cin_g/ci)(KH/ckh)(KW/ckw) slots
//                                        (dynamic/ODConv: [B, K] = [B, 1, K])
//   sa    [B, KH, KW]   ca [B, Cin]   fa [B, Cout]   bias [n, Cout] (S = 1 only); all nullable
// Kernel position (o, c, ky, kx) (c < Cin_g) lies in slot
//   s(o,c,ky,kx) = ((o/co * (Cin_g/ci) + c/ci) * (KH/ckh) + ky/ckh) * (KW/ckw) + kx/ckw
// at cell-local index l(o,c,ky,kx) = ((o%co * ci + c%ci) * ckh + ky%ckh) * ckw + kx%ckw.
//
// Forward, with i = g*Cin_g + c for output channel o of group g, pos = (iy, ix) =
// (oy*SH - PH + ky*DH, ox*SW - PW + kx*DW) (terms outside the image are 0):
//   M_b[o,c,ky,kx] = sum_j att[b, s, j] * cells[j, l]            (the mixed kernel)
//   W_b[o,c,ky,kx] = sa[b,ky,kx] * M_b[o,c,ky,kx]
//   inner[b,o,p]   = sum_{c,ky,kx} W_b[o,c,ky,kx] * ca[b,i] * x[b,i,pos]
//   y[b,o,p]       = fa[b,o] * inner[b,o,p] + sum_j att[b,0,j] * bias[j,o]
// (an absent sa/ca/fa is 1, an absent bias 0).
//
// Gradients, with gy = dL/dy, G[b,o,p] = fa[b,o] * gy[b,o,p] and the per-sample kernel
// gradient U_b[o,c,ky,kx] = sum_p G[b,o,p] * ca[b,i] * x[b,i,pos] (never stored):
//   ginner[b,i,q] = sum_{o in group(i), ky, kx} W_b[o,c,ky,kx] * G[b,o,(q - tap)/stride]   (gather,
//                   as conv2d_bwd_input)
//   dx[b,i,q]     = ca[b,i] * ginner[b,i,q]
//   dca[b,i]      = sum_q x[b,i,q] * ginner[b,i,q]
//   dcells[j,l]   = sum_b sum_{positions with cell-local index l} att[b,s,j] * sa[b,ky,kx] * U_b[pos]
//   datt[b,s,j]   = sum_{positions in slot s} sa[b,ky,kx] * cells[j,l] * U_b[pos]  (+ sum_{o,p} gy * bias[j,o])
//                 = sum_{o,p} G[b,o,p] * conv_{s,j}[b,o,p] + ...   (conv_{s,j}: the conv of ca*x
//                   with the slot-s part of cells[j] times sa: K partial convs, not U_b)
//   dsa[b,ky,kx]  = sum_{o,c} M_b[o,c,ky,kx] * U_b[o,c,ky,kx] = sum_{o,p} G[b,o,p] * (sum_c M_b * ca*x)[tap]
//   dfa[b,o]      = sum_p gy[b,o,p] * inner[b,o,p],   inner = sum_{s,j} att[b,s,j] * conv_{s,j}
//   dbias[j,o]    = sum_{b,p} att[b,0,j] * gy[b,o,p]
//
// Thread mapping (every reduction is a fixed-order block_reduce_sum or a fixed-order
// loop, never an atomic: bitwise reproducible for a fixed launch shape):
//   dynamic_conv2d_fwd / _bwd_input: conv2d_fwd / conv2d_bwd_input's skeletons
//     (common/direct_conv.cuh) with their own staging and epilogue: a block owns
//     blockDim.x consecutive pixels of one (b, channel) plane, one thread per pixel; the
//     block's per-sample kernel entries are COMPUTED into shared memory (p.chunk (channel,
//     tap) entries at a time: the mixture over the n cells, times sa, times fa in the
//     backward) and shared by every thread. ca scales the x loads (forward) or the result
//     (backward), fa the forward epilogue. _bwd_input also writes the block's partial of
//     dca to a workspace [B, Cin, tiles_in] (tiles_in = ceil(H*W / blockDim.x)).
//   dynamic_conv2d_bwd_attention: a block owns (b, o, pixel tile); for each slot of row o
//     and each group of DYN_ACC cells it runs the DYN_ACC partial convs (registers), weighs
//     them by G, reduces over the tile and writes one partial per (b, s, j, o%co, tile) to a
//     workspace [B, S, n, co * tiles]; the same pass gives inner and the dfa partials
//     [B, Cout, tiles]. The work is ceil(n / DYN_ACC) convolutions.
//   dynamic_conv2d_bwd_spatial_attention: the same block shape, DYN_ACC taps at a time,
//     partials to a workspace [B, taps, Cout * tiles].
//   dynamic_conv2d_reduce: a block per workspace row sums its columns (block_reduce_sum).
//   dynamic_conv2d_bwd_weight: a block owns one cell-local index l and reduces over (slot,
//     b, pixel) for DYN_ACC cells at a time: each thread keeps a running sum for the current
//     (slot, b) and folds it into its DYN_ACC accumulators with att[b, s, j] when (slot, b)
//     changes, so the attention costs DYN_ACC FMAs per (slot, b) run, not per pixel.
//   dynamic_conv2d_bwd_bias: a block owns one output channel, DYN_ACC cells at a time.
// Blocks walk their work items with a grid-stride loop, so any grid size is valid.
#include "common/direct_conv.cuh"

// Accumulators one thread keeps in registers in the multi-output reductions (cells j or
// taps handled per pass); n cells cost ceil(n / DYN_ACC) passes, so n is unbounded.
constexpr int DYN_ACC = 8;

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct DynamicConvParams : ConvGeometryParams {
  long long groups;
  long long cells, cell_out, cell_in, cell_h, cell_w;  // n, co, ci, ckh, ckw
  long long slots;                                     // S
  long long chunk;  // (channel, tap) kernel entries staged in shared memory at a time
  long long rows, cols;  // dynamic_conv2d_reduce: workspace [rows, cols]
};

// Slot and cell-local index of kernel position (o, c, ky, kx) (see the layout note).
struct CellIndex {
  index_t slot, local;
  __device__ CellIndex(const DynamicConvParams& p, index_t o, index_t c, index_t ky, index_t kx) {
    const index_t cin_g = p.in_channels / p.groups;
    const index_t slots_c = cin_g / p.cell_in, slots_h = p.kernel_h / p.cell_h, slots_w = p.kernel_w / p.cell_w;
    slot = ((o / p.cell_out * slots_c + c / p.cell_in) * slots_h + ky / p.cell_h) * slots_w + kx / p.cell_w;
    local = ((o % p.cell_out * p.cell_in + c % p.cell_in) * p.cell_h + ky % p.cell_h) * p.cell_w + kx % p.cell_w;
  }
};

// M_b[o, c, ky, kx]: the attention-weighted mixture of the n cells at one kernel position.
template <typename T>
__device__ typename Accumulator<T>::type mixed_weight(const DynamicConvParams& p, const T* __restrict__ cells,
                                                      const T* __restrict__ att, index_t b, index_t o, index_t c,
                                                      index_t ky, index_t kx) {
  typedef typename Accumulator<T>::type Acc;
  const CellIndex at(p, o, c, ky, kx);
  const index_t cell_size = p.cell_out * p.cell_in * p.cell_h * p.cell_w;
  const T* a = att + (b * p.slots + at.slot) * p.cells;
  Acc w = Acc(0);
  for (index_t j = 0; j < p.cells; ++j) w += to_acc(a[j]) * to_acc(cells[j * cell_size + at.local]);
  return w;
}

// ca[b, i] * x[b, i, iy, ix], 0 outside the image.
template <typename T>
__device__ __forceinline__ typename Accumulator<T>::type scaled_input(const DynamicConvParams& p,
                                                                      const T* __restrict__ x,
                                                                      const T* __restrict__ ca, index_t b, index_t i,
                                                                      index_t iy, index_t ix) {
  typedef typename Accumulator<T>::type Acc;
  if (iy < 0 || iy >= p.in_h || ix < 0 || ix >= p.in_w) return Acc(0);
  const Acc v = to_acc(x[((b * p.in_channels + i) * p.in_h + iy) * p.in_w + ix]);
  return ca != nullptr ? v * to_acc(ca[b * p.in_channels + i]) : v;
}

template <typename T>
__global__ void dynamic_conv2d_fwd(const DynamicConvParams p, const T* __restrict__ x, const T* __restrict__ cells,
                                   const T* __restrict__ att, const T* __restrict__ sa, const T* __restrict__ ca,
                                   const T* __restrict__ fa, const T* __restrict__ bias, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, w_chunk);
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w;
  direct_conv_fwd(
      p, p.groups, p.chunk, w_chunk, [](const PlanePixel&) { return Acc(0); },
      [&](const PlanePixel& q, index_t k) {  // W_b[o, k], computed on chip
        const index_t c = k / taps, tap = k % taps;
        const index_t ky = tap / p.kernel_w, kx = tap % p.kernel_w;
        Acc w = mixed_weight(p, cells, att, q.b, q.channel, c, ky, kx);
        if (sa != nullptr) w *= to_acc(sa[q.b * taps + tap]);
        return w;
      },
      [&](Acc& acc, Acc w, const PlanePixel& q, index_t i, index_t iy, index_t ix) {
        acc += w * scaled_input(p, x, ca, q.b, i, iy, ix);  // the padding: w * 0
      },
      [&](const PlanePixel& q, index_t, Acc acc) {
        if (!q.active) return;
        if (fa != nullptr) acc *= to_acc(fa[q.plane]);  // the filter attention: the epilogue
        if (bias != nullptr) {                          // the bias mixture (S = 1)
          for (index_t j = 0; j < p.cells; ++j)
            acc += to_acc(att[q.b * p.cells + j]) * to_acc(bias[j * p.out_channels + q.channel]);
        }
        y[q.plane * pixels + q.pix] = from_acc<T>(acc);
      });
}

// grad_x (nullable) = ca * ginner; ca_partial (nullable, [B, Cin, tiles] in Acc) = the
// block's sum of x * ginner for dca.
template <typename T>
__global__ void dynamic_conv2d_bwd_input(const DynamicConvParams p, const T* __restrict__ grad_y,
                                         const T* __restrict__ x, const T* __restrict__ cells,
                                         const T* __restrict__ att, const T* __restrict__ sa,
                                         const T* __restrict__ ca, const T* __restrict__ fa, T* __restrict__ grad_x,
                                         typename Accumulator<T>::type* __restrict__ ca_partial) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, w_chunk);
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.in_h * p.in_w;
  direct_conv_bwd_input(
      p, p.groups, p.chunk, ConvOutLayout<index_t>(1, p.out_channels, p.out_h, p.out_w), grad_y, w_chunk,
      [](const PlanePixel&) { return Acc(0); },
      [&](const PlanePixel& q, index_t o, index_t c, index_t tap) {  // fa[b,o] * W_b[o, c, tap], on chip
        Acc w = mixed_weight(p, cells, att, q.b, o, c, tap / p.kernel_w, tap % p.kernel_w);
        if (sa != nullptr) w *= to_acc(sa[q.b * taps + tap]);
        if (fa != nullptr) w *= to_acc(fa[q.b * p.out_channels + o]);
        return w;
      },
      [&](const PlanePixel& q, index_t item, Acc acc) {
        if (q.active && grad_x != nullptr)
          grad_x[q.plane * pixels + q.pix] = from_acc<T>(ca != nullptr ? acc * to_acc(ca[q.plane]) : acc);
        if (ca_partial != nullptr) {  // uniform per block: every thread reaches the reduction
          const Acc part = block_reduce_sum(q.active ? acc * to_acc(x[q.plane * pixels + q.pix]) : Acc(0));
          if (threadIdx.x == 0) ca_partial[item] = part;
        }
      });
}

// att_partial (nullable): [B, S, n, co * tiles]; fa_partial (nullable): [B, Cout, tiles].
template <typename T>
__global__ void dynamic_conv2d_bwd_attention(const DynamicConvParams p, const T* __restrict__ grad_y,
                                             const T* __restrict__ x, const T* __restrict__ cells,
                                             const T* __restrict__ att, const T* __restrict__ sa,
                                             const T* __restrict__ ca, const T* __restrict__ fa,
                                             const T* __restrict__ bias,
                                             typename Accumulator<T>::type* __restrict__ att_partial,
                                             typename Accumulator<T>::type* __restrict__ fa_partial) {
  typedef typename Accumulator<T>::type Acc;
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, cell_size = p.cell_out * p.cell_in * p.cell_h * p.cell_w;
  const index_t slots_c = cin_g / p.cell_in, slots_h = p.kernel_h / p.cell_h, slots_w = p.kernel_w / p.cell_w;
  const index_t row_slots = slots_c * slots_h * slots_w;  // the slots one output channel's filter spans
  const index_t pixels = p.out_h * p.out_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.out_channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const PlanePixel q(item, tiles, p.out_channels, p.out_w, pixels);
    const index_t o = q.channel, b = q.b, i0 = (o / cout_g) * cin_g;
    const Acc gy = q.active ? to_acc(grad_y[q.plane * pixels + q.pix]) : Acc(0);
    const Acc gw = fa != nullptr ? gy * to_acc(fa[q.plane]) : gy;  // G = fa * gy
    Acc inner = Acc(0);
    for (index_t sr = 0; sr < row_slots; ++sr) {
      const index_t s = (o / p.cell_out) * row_slots + sr;
      const index_t cb = sr / (slots_h * slots_w), yb = (sr / slots_w) % slots_h, xb = sr % slots_w;
      for (index_t j0 = 0; j0 < p.cells; j0 += DYN_ACC) {
        Acc acc[DYN_ACC];
#pragma unroll
        for (int r = 0; r < DYN_ACC; ++r) acc[r] = Acc(0);
        if (q.active) {
          // conv_{s,j}[b,o,pix] for DYN_ACC cells j: the slot's (c, ky, kx) block only
          for (index_t lc = 0; lc < p.cell_in; ++lc) {
            const index_t c = cb * p.cell_in + lc;
            for (index_t ly = 0; ly < p.cell_h; ++ly) {
              const index_t ky = yb * p.cell_h + ly;
              const index_t iy = q.y * p.stride_h - p.pad_h + ky * p.dilation_h;
              for (index_t lx = 0; lx < p.cell_w; ++lx) {
                const index_t kx = xb * p.cell_w + lx;
                const index_t ix = q.x * p.stride_w - p.pad_w + kx * p.dilation_w;
                Acc v = scaled_input(p, x, ca, b, i0 + c, iy, ix);
                if (sa != nullptr) v *= to_acc(sa[b * taps + ky * p.kernel_w + kx]);
                const T* cell = cells + (((o % p.cell_out) * p.cell_in + lc) * p.cell_h + ly) * p.cell_w + lx;
#pragma unroll
                for (int r = 0; r < DYN_ACC; ++r)
                  if (j0 + r < p.cells) acc[r] += to_acc(cell[(j0 + r) * cell_size]) * v;
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < DYN_ACC; ++r) {
          if (j0 + r >= p.cells) break;  // uniform over the block
          const index_t j = j0 + r;
          inner += to_acc(att[(b * p.slots + s) * p.cells + j]) * acc[r];
          if (att_partial == nullptr) continue;
          Acc term = gw * acc[r];
          if (bias != nullptr) term += gy * to_acc(bias[j * p.out_channels + o]);
          term = block_reduce_sum(term);
          const index_t row = (b * p.slots + s) * p.cells + j;  // the workspace row of datt[b, s, j]
          if (threadIdx.x == 0) att_partial[row * (p.cell_out * tiles) + (o % p.cell_out) * tiles + q.tile] = term;
        }
      }
    }
    if (fa_partial != nullptr) {
      const Acc part = block_reduce_sum(gy * inner);
      if (threadIdx.x == 0) fa_partial[item] = part;
    }
  }
}

// sa_partial: [B, taps, Cout * tiles].
template <typename T>
__global__ void dynamic_conv2d_bwd_spatial_attention(const DynamicConvParams p, const T* __restrict__ grad_y,
                                                     const T* __restrict__ x, const T* __restrict__ cells,
                                                     const T* __restrict__ att, const T* __restrict__ ca,
                                                     const T* __restrict__ fa,
                                                     typename Accumulator<T>::type* __restrict__ sa_partial) {
  typedef typename Accumulator<T>::type Acc;
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w;
  const index_t pixels = p.out_h * p.out_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.out_channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const PlanePixel q(item, tiles, p.out_channels, p.out_w, pixels);
    const index_t o = q.channel, b = q.b, i0 = (o / cout_g) * cin_g;
    Acc gw = q.active ? to_acc(grad_y[q.plane * pixels + q.pix]) : Acc(0);
    if (fa != nullptr) gw *= to_acc(fa[q.plane]);
    for (index_t t0 = 0; t0 < taps; t0 += DYN_ACC) {
      Acc acc[DYN_ACC];
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) acc[r] = Acc(0);
      if (q.active) {
        for (index_t c = 0; c < cin_g; ++c) {
#pragma unroll
          for (int r = 0; r < DYN_ACC; ++r) {
            const index_t tap = t0 + r;
            if (tap >= taps) break;
            const index_t ky = tap / p.kernel_w, kx = tap % p.kernel_w;
            const Acc v = scaled_input(p, x, ca, b, i0 + c, q.y * p.stride_h - p.pad_h + ky * p.dilation_h,
                                       q.x * p.stride_w - p.pad_w + kx * p.dilation_w);
            acc[r] += mixed_weight(p, cells, att, b, o, c, ky, kx) * v;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) {
        if (t0 + r >= taps) break;  // uniform over the block
        const Acc part = block_reduce_sum(gw * acc[r]);
        if (threadIdx.x == 0) sa_partial[(b * taps + t0 + r) * (p.out_channels * tiles) + o * tiles + q.tile] = part;
      }
    }
  }
}

// out[row] = sum_{col < cols} ws[row, col], in a fixed order.
template <typename T>
__global__ void dynamic_conv2d_reduce(const DynamicConvParams p, const typename Accumulator<T>::type* __restrict__ ws,
                                      T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  for (index_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    Acc acc = Acc(0);
    for (index_t col = threadIdx.x; col < p.cols; col += blockDim.x) acc += ws[row * p.cols + col];
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) out[row] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void dynamic_conv2d_bwd_weight(const DynamicConvParams p, const T* __restrict__ grad_y,
                                          const T* __restrict__ x, const T* __restrict__ att,
                                          const T* __restrict__ sa, const T* __restrict__ ca,
                                          const T* __restrict__ fa, T* __restrict__ grad_cells) {
  typedef typename Accumulator<T>::type Acc;
  const index_t cin_g = p.in_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, cell_size = p.cell_out * p.cell_in * p.cell_h * p.cell_w;
  const index_t slots_c = cin_g / p.cell_in, slots_h = p.kernel_h / p.cell_h, slots_w = p.kernel_w / p.cell_w;
  const index_t pixels = p.out_h * p.out_w, n = p.slots * p.batch * pixels;
  for (index_t l = blockIdx.x; l < cell_size; l += gridDim.x) {
    const index_t lx = l % p.cell_w, ly = (l / p.cell_w) % p.cell_h;
    const index_t lc = (l / (p.cell_w * p.cell_h)) % p.cell_in, lo = l / (p.cell_w * p.cell_h * p.cell_in);
    for (index_t j0 = 0; j0 < p.cells; j0 += DYN_ACC) {
      Acc acc[DYN_ACC];
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) acc[r] = Acc(0);
      index_t run = -1;  // the (slot, b) of the running sum
      Acc partial = Acc(0);
      index_t o = 0, c = 0, ky = 0, kx = 0, b = 0;
      for (index_t e = threadIdx.x;; e += blockDim.x) {
        const index_t here = e < n ? e / pixels : -2;  // slot * B + b; past the end: flush the last run
        if (here != run) {
          if (run >= 0) {
            const T* a = att + ((run % p.batch) * p.slots + run / p.batch) * p.cells;
#pragma unroll
            for (int r = 0; r < DYN_ACC; ++r)
              if (j0 + r < p.cells) acc[r] += to_acc(a[j0 + r]) * partial;
          }
          if (e >= n) break;
          run = here, partial = Acc(0);
          const index_t s = here / p.batch;
          b = here % p.batch;
          o = s / (slots_c * slots_h * slots_w) * p.cell_out + lo;
          c = (s / (slots_h * slots_w)) % slots_c * p.cell_in + lc;
          ky = (s / slots_w) % slots_h * p.cell_h + ly;
          kx = s % slots_w * p.cell_w + lx;
        }
        const index_t pix = e % pixels, oy = pix / p.out_w, ox = pix % p.out_w;
        const index_t i = (o / (p.out_channels / p.groups)) * cin_g + c;
        Acc v = scaled_input(p, x, ca, b, i, oy * p.stride_h - p.pad_h + ky * p.dilation_h,
                             ox * p.stride_w - p.pad_w + kx * p.dilation_w);
        v *= to_acc(grad_y[(b * p.out_channels + o) * pixels + pix]);
        if (fa != nullptr) v *= to_acc(fa[b * p.out_channels + o]);
        if (sa != nullptr) v *= to_acc(sa[b * taps + ky * p.kernel_w + kx]);
        partial += v;
      }
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) {
        if (j0 + r >= p.cells) break;  // uniform over the block
        const Acc total = block_reduce_sum(acc[r]);
        if (threadIdx.x == 0) grad_cells[(j0 + r) * cell_size + l] = from_acc<T>(total);
      }
    }
  }
}

// grad_bias [n, Cout] (S = 1).
template <typename T>
__global__ void dynamic_conv2d_bwd_bias(const DynamicConvParams p, const T* __restrict__ grad_y,
                                        const T* __restrict__ att, T* __restrict__ grad_bias) {
  typedef typename Accumulator<T>::type Acc;
  const index_t pixels = p.out_h * p.out_w, n = p.batch * pixels;
  for (index_t o = blockIdx.x; o < p.out_channels; o += gridDim.x) {
    for (index_t j0 = 0; j0 < p.cells; j0 += DYN_ACC) {
      Acc acc[DYN_ACC];
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) acc[r] = Acc(0);
      for (index_t e = threadIdx.x; e < n; e += blockDim.x) {
        const index_t b = e / pixels;
        const Acc g = to_acc(grad_y[(b * p.out_channels + o) * pixels + e % pixels]);
#pragma unroll
        for (int r = 0; r < DYN_ACC; ++r)
          if (j0 + r < p.cells) acc[r] += to_acc(att[b * p.cells + j0 + r]) * g;
      }
#pragma unroll
      for (int r = 0; r < DYN_ACC; ++r) {
        if (j0 + r >= p.cells) break;
        const Acc total = block_reduce_sum(acc[r]);
        if (threadIdx.x == 0) grad_bias[(j0 + r) * p.out_channels + o] = from_acc<T>(total);
      }
    }
  }
}
