// involution: involution2d (Li et al., "Involution: Inverting the Inherence of
// Convolution for Visual Recognition", CVPR 2021), forward and backward. The kernel
// is an input of the op (generated outside it, per image and per output pixel); it is
// shared by the C/G channels of its group.
//
// Layout (contiguous; G = groups, Cg = C / G, channel c belongs to group g = c / Cg,
// taps = KH*KW, tap t = i*KW + j):
//   x  [B, C, H, W]    K  [B, G, KH, KW, Ho, Wo]    y  [B, C, Ho, Wo]
//   Ho, Wo = conv_output_size(H, W, KH/KW, stride, padding, dilation) (checked on the host).
//
// Forward (padding is zeros: a tap in the padding multiplies K by 0):
//   y[b,c,oy,ox] = sum_{i<KH, j<KW} K[b,g,i,j,oy,ox] * x[b, c, oy*SH - PH + i*DH, ox*SW - PW + j*DW]
//
// Gradients, with gy = dL/dy:
//   dL/dx[b,c,iy,ix]     = sum_{(i,j)} K[b,g,i,j,oy,ox] * gy[b,c,oy,ox]
//                          over the (i,j) with oy = (iy + PH - i*DH) / SH an integer in [0, Ho)
//                          and ox = (ix + PW - j*DW) / SW an integer in [0, Wo): a gather.
//   dL/dK[b,g,i,j,oy,ox] = sum_{c in g} gy[b,c,oy,ox] * x[b, c, oy*SH - PH + i*DH, ox*SW - PW + j*DW]
//                          (x is 0 in the padding): a reduction over the group's Cg channels.
//
// Thread mapping:
//   involution2d_fwd: a block item is (b, g, a TH x TW tile of output pixels, a chunk of
//     at most p.chunk of the group's channels). Phase 1 stages, in the accumulator type,
//     the tile's kernel K[b,g,:,:,tile] into shared memory k_s[t * P + q] (P = TH*TW,
//     q = ty*TW + tx) and the chunk's input halo x[b, c, rows, cols] into x_s[c][r][s]
//     (SPAN_H x SPAN_W per channel, SPAN_H = (TH-1)*SH + (KH-1)*DH + 1, zeros where the
//     halo leaves the image: that IS the zero padding). __syncthreads. Phase 2: the
//     threads stride over ceil(chunk/R) x P items, R = INVOLUTION_CHANNELS_PER_THREAD
//     channels at one pixel (consecutive threads -> consecutive pixels); every kernel
//     value read from shared memory feeds R FMAs, so a pixel's kernel is loaded from
//     device memory once per chunk and reused by the chunk's channels.
//     Shared memory: (taps*P + chunk*SPAN_H*SPAN_W) * sizeof(Acc), planned on the host.
//   involution2d_direct_fwd: the fallback when not even a 1x1 tile of one channel fits
//     the shared-memory budget (huge dilated windows): one thread per output element,
//     reading K and x from device memory; same arithmetic and summation order.
//   involution2d_bwd_input: a block item is (b, g, R channels of the group, blockDim.x
//     consecutive input pixels); a thread owns one input pixel and R channels, gathers
//     over the taps that reach it, and reuses each kernel value for its R channels.
//   involution2d_bwd_kernel: a block item is (b, g, RT = INVOLUTION_TAPS_PER_THREAD
//     consecutive taps, blockDim.x consecutive output pixels); a thread owns RT kernel
//     elements at one pixel and sums over the group's channels in ascending order (each
//     gy value read once feeds RT FMAs). No atomics anywhere: every output element is
//     written by one thread with a fixed summation order, so all passes are bitwise
//     reproducible.
// Blocks walk their work items with a grid-stride loop, so any grid size is valid.
#include "common/cuconv.cuh"

// Channels one forward / grad-input thread computes: each kernel value feeds this many FMAs.
constexpr int INVOLUTION_CHANNELS_PER_THREAD = 4;
// Kernel taps one grad-kernel thread reduces: each gy value feeds this many FMAs.
constexpr int INVOLUTION_TAPS_PER_THREAD = 4;

// One struct for every kernel of the file; every field is a 64-bit integer so the host
// can pack it as a flat int64 array.
struct InvolutionParams {
  long long batch, channels, in_h, in_w, groups, out_h, out_w;
  long long kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  long long tile_h, tile_w;  // involution2d_fwd: output pixels of a block item (TH x TW)
  long long chunk;           // involution2d_fwd: channels of the group per block item
  long long span_h, span_w;  // involution2d_fwd: input halo of a full tile
};

// What every kernel derives from the params: channels per group, taps, output and input
// plane sizes.
struct InvolutionSizes {
  index_t cg, taps, out_plane, in_plane;
  __device__ static InvolutionSizes of(const InvolutionParams& p) {
    return {p.channels / p.groups, p.kernel_h * p.kernel_w, p.out_h * p.out_w, p.in_h * p.in_w};
  }
};

// (b, g) and part of a backward block item: items run (b, g)-major, then part (R channels
// of the group, or RT taps), then tile (of blockDim.x pixels).
struct GroupPart {
  index_t part, bg, g, b;  // bg = b * G + g
  __device__ GroupPart(const InvolutionParams& p, index_t item, index_t tiles, index_t parts)
      : part((item / tiles) % parts), bg(item / (tiles * parts)), g(bg % p.groups), b(bg / p.groups) {}
};

// Block-local indices (shared-memory entries, items of one block item) are 32-bit: the
// host bounds them below 2**31. Offsets into device tensors are 64-bit.

template <typename T>
__global__ void involution2d_fwd(const InvolutionParams p, const T* __restrict__ x, const T* __restrict__ kernel,
                                 T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = INVOLUTION_CHANNELS_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, k_s);  // [taps][P], then x_s [chunk][span_h][span_w]
  const auto [cg, taps, out_plane, in_plane] = InvolutionSizes::of(p);
  const unsigned tw = unsigned(p.tile_w), n_pix = unsigned(p.tile_h * p.tile_w);
  const unsigned span_h = unsigned(p.span_h), span_w = unsigned(p.span_w), halo = span_h * span_w;
  Acc* x_s = k_s + taps * n_pix;
  const index_t tiles_w = ceil_div(p.out_w, p.tile_w), tiles = ceil_div(p.out_h, p.tile_h) * tiles_w;
  const index_t chunks = ceil_div(cg, p.chunk);
  const index_t items = p.batch * p.groups * tiles * chunks;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t chunk = item % chunks, tile = (item / chunks) % tiles;
    const index_t bg = item / (chunks * tiles);  // b * G + g
    const index_t g = bg % p.groups, b = bg / p.groups;
    const index_t oy0 = (tile / tiles_w) * p.tile_h, ox0 = (tile % tiles_w) * p.tile_w;
    const index_t iy0 = oy0 * p.stride_h - p.pad_h, ix0 = ox0 * p.stride_w - p.pad_w;  // halo origin
    const index_t c0 = g * cg + chunk * p.chunk;                     // first channel of the chunk
    const unsigned n_c = unsigned(min_index(p.chunk, (g + 1) * cg - c0));  // channels in this chunk
    __syncthreads();  // every thread is done reading the previous item's tiles
    // Phase 1a: the tile's kernel, K[b, g, t, oy0 + ty, ox0 + tx] -> k_s[t * P + q].
    const T* k_bg = kernel + bg * taps * out_plane;
    for (unsigned e = threadIdx.x; e < unsigned(taps) * n_pix; e += blockDim.x) {
      const unsigned t = e / n_pix, q = e % n_pix;
      const index_t oy = oy0 + q / tw, ox = ox0 + q % tw;
      k_s[e] = oy < p.out_h && ox < p.out_w ? to_acc(k_bg[t * out_plane + oy * p.out_w + ox]) : Acc(0);
    }
    // Phase 1b: the chunk's input halo (zeros outside the image: the padding).
    const T* x_c0 = x + (b * p.channels + c0) * in_plane;
    for (unsigned e = threadIdx.x; e < n_c * halo; e += blockDim.x) {
      const unsigned c = e / halo, r = (e % halo) / span_w, s = e % span_w;
      const index_t iy = iy0 + r, ix = ix0 + s;
      x_s[e] = iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w ? to_acc(x_c0[c * in_plane + iy * p.in_w + ix])
                                                                 : Acc(0);
    }
    __syncthreads();
    // Phase 2: R channels at one pixel per item; each k_s read feeds R FMAs.
    const unsigned quads = (n_c + R - 1) / R;
    for (unsigned e = threadIdx.x; e < quads * n_pix; e += blockDim.x) {
      const unsigned cq = (e / n_pix) * R, q = e % n_pix;
      const unsigned ty = q / tw, tx = q % tw;
      const index_t oy = oy0 + ty, ox = ox0 + tx;
      if (oy >= p.out_h || ox >= p.out_w) continue;  // past the edge of a short tile
      const Acc* xr[R];
      Acc acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned c = cq + r < n_c ? cq + r : n_c - 1;  // past the chunk: a duplicate, not stored
        xr[r] = x_s + c * halo + ty * unsigned(p.stride_h) * span_w + tx * unsigned(p.stride_w);
        acc[r] = Acc(0);
      }
      const Acc* kq = k_s + q;
      for (index_t i = 0; i < p.kernel_h; ++i) {
        const unsigned row = unsigned(i * p.dilation_h) * span_w;
        for (index_t j = 0; j < p.kernel_w; ++j, kq += n_pix) {
          const Acc k = *kq;
          const unsigned off = row + unsigned(j * p.dilation_w);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += k * xr[r][off];
        }
      }
      T* out = y + (b * p.channels + c0 + cq) * out_plane + oy * p.out_w + ox;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (cq + r < n_c) out[r * out_plane] = from_acc<T>(acc[r]);
    }
  }
}

template <typename T>
__global__ void involution2d_direct_fwd(const InvolutionParams p, const T* __restrict__ x,
                                        const T* __restrict__ kernel, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  const auto [cg, taps, out_plane, in_plane] = InvolutionSizes::of(p);
  const index_t tiles = ceil_div(out_plane, blockDim.x), items = p.batch * p.channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t plane = item / tiles;  // b * C + c
    const index_t pix = (item % tiles) * blockDim.x + threadIdx.x;
    if (pix >= out_plane) continue;
    const index_t c = plane % p.channels, b = plane / p.channels;
    const index_t oy = pix / p.out_w, ox = pix % p.out_w;
    const T* kq = kernel + (b * p.groups + c / cg) * taps * out_plane + pix;
    const T* xc = x + plane * in_plane;
    Acc acc = Acc(0);
    for (index_t i = 0; i < p.kernel_h; ++i) {
      const index_t iy = oy * p.stride_h - p.pad_h + i * p.dilation_h;
      for (index_t j = 0; j < p.kernel_w; ++j, kq += out_plane) {
        const index_t ix = ox * p.stride_w - p.pad_w + j * p.dilation_w;
        const bool inside = iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w;
        acc += to_acc(*kq) * (inside ? to_acc(xc[iy * p.in_w + ix]) : Acc(0));  // padding: K * 0
      }
    }
    y[plane * out_plane + pix] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void involution2d_bwd_input(const InvolutionParams p, const T* __restrict__ grad_y,
                                       const T* __restrict__ kernel, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = INVOLUTION_CHANNELS_PER_THREAD;
  const auto [cg, taps, out_plane, in_plane] = InvolutionSizes::of(p);
  const index_t tiles = ceil_div(in_plane, blockDim.x), quads = ceil_div(cg, R);
  const index_t items = p.batch * p.groups * quads * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t pix = (item % tiles) * blockDim.x + threadIdx.x;
    if (pix >= in_plane) continue;
    const auto [quad, bg, g, b] = GroupPart(p, item, tiles, quads);
    const index_t cq = quad * R;  // the first of the thread's R channels, within the group
    const index_t iy = pix / p.in_w, ix = pix % p.in_w;
    const index_t plane0 = b * p.channels + g * cg + cq;  // (b, c) plane of the first channel
    const T* k_bg = kernel + bg * taps * out_plane;
    const T* gy[R];
    Acc acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      gy[r] = grad_y + (plane0 + min_index(r, cg - cq - 1)) * out_plane;  // past the group: a duplicate
      acc[r] = Acc(0);
    }
    for (index_t i = 0; i < p.kernel_h; ++i) {
      const index_t ty = iy + p.pad_h - i * p.dilation_h;
      if (ty < 0) break;  // ty only decreases with i
      if (ty % p.stride_h != 0 || ty / p.stride_h >= p.out_h) continue;
      const index_t oy = ty / p.stride_h;
      for (index_t j = 0; j < p.kernel_w; ++j) {
        const index_t tx = ix + p.pad_w - j * p.dilation_w;
        if (tx < 0) break;
        if (tx % p.stride_w != 0 || tx / p.stride_w >= p.out_w) continue;
        const index_t o = oy * p.out_w + tx / p.stride_w;
        const Acc k = to_acc(k_bg[(i * p.kernel_w + j) * out_plane + o]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += k * to_acc(gy[r][o]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (cq + r < cg) grad_x[(plane0 + r) * in_plane + pix] = from_acc<T>(acc[r]);
  }
}

template <typename T>
__global__ void involution2d_bwd_kernel(const InvolutionParams p, const T* __restrict__ grad_y,
                                        const T* __restrict__ x, T* __restrict__ grad_kernel) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int RT = INVOLUTION_TAPS_PER_THREAD;
  const auto [cg, taps, out_plane, in_plane] = InvolutionSizes::of(p);
  const index_t tiles = ceil_div(out_plane, blockDim.x), tap_groups = ceil_div(taps, RT);
  const index_t items = p.batch * p.groups * tap_groups * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t pix = (item % tiles) * blockDim.x + threadIdx.x;
    if (pix >= out_plane) continue;
    const auto [tap_group, bg, g, b] = GroupPart(p, item, tiles, tap_groups);
    const index_t t0 = tap_group * RT;  // the first of the thread's RT taps
    const index_t oy = pix / p.out_w, ox = pix % p.out_w;
    index_t off[RT];  // x offset of each tap within a channel plane
    bool inside[RT];
    Acc acc[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const index_t t = min_index(t0 + r, taps - 1);  // past the last tap: a duplicate, not stored
      const index_t iy = oy * p.stride_h - p.pad_h + (t / p.kernel_w) * p.dilation_h;
      const index_t ix = ox * p.stride_w - p.pad_w + (t % p.kernel_w) * p.dilation_w;
      inside[r] = iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w;
      off[r] = inside[r] ? iy * p.in_w + ix : 0;
      acc[r] = Acc(0);
    }
    const index_t plane0 = b * p.channels + g * cg;
    const T* gy = grad_y + plane0 * out_plane + pix;
    const T* xc = x + plane0 * in_plane;
    for (index_t c = 0; c < cg; ++c, gy += out_plane, xc += in_plane) {  // fixed order: deterministic
      const Acc v = to_acc(*gy);
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[r] += v * (inside[r] ? to_acc(xc[off[r]]) : Acc(0));  // padding: gy * 0
    }
    T* out = grad_kernel + (bg * taps + t0) * out_plane + pix;
#pragma unroll
    for (int r = 0; r < RT; ++r)
      if (t0 + r < taps) out[r * out_plane] = from_acc<T>(acc[r]);
  }
}
