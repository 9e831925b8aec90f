// dcn: the core operators of DCNv3 (InternImage) and DCNv4 (FlashInternImage): a
// channels-last deformable AGGREGATION (no weight inside the op; the projections live in
// the layer around it), with the official CUDA kernels' semantics, forward and every
// gradient, deterministic (no float atomics).
//
// Layout (contiguous, channels-last; G groups, D = group_channels, C = G*D, Q = N*Ho*Wo
// output pixels flattened as q = (n*Ho + oh)*Wo + ow):
//   x [N, H, W, C]           y [N, Ho, Wo, C]      Ho, Wo: the conv formula over (kh, kw),
//                                                  stride, padding and dilation
//   offset of (q, g, k): channel g*off_group_stride + 2k (dx) and + 2k + 1 (dy) of an
//     array with off_pixel_stride channels per pixel
//   mask   of (q, g, k): channel g*mask_group_stride + mask_base + k of an array with
//     mask_pixel_stride channels per pixel
//   DCNv3: offset [N, Ho, Wo, G*K*2] (group stride 2K) and mask [N, Ho, Wo, G*K]
//     (group stride K, base 0): two arrays.
//   DCNv4: offset_mask [N, Ho, Wo, P] passed as both arrays: group stride 3K for both,
//     mask base 2K; channels [3GK, P) are padding, ignored, with an exactly zero gradient.
//   So one kernel family serves both ops: only these layout fields differ.
//
// Taps: the x index runs OUTSIDE: raw tap r = i*kh + j, i in [0, kw), j in [0, kh).
// remove_center skips r_c = (kw/2)*kh + kh/2 (host: kh, kw odd), so K = kh*kw - 1 and
// tap k is raw tap k < r_c ? k : k + 1; else K = kh*kw and tap k is raw tap k.
//
// Sampling point of tap (i, j) of group g at output (oh, ow), s = offset_scale (it scales
// the fixed dilation grid as well as the learned offset), cx = (dw*(kw-1)) / 2 and
// cy = (dh*(kh-1)) / 2 (integer division: even extents are asymmetric):
//   px = ow*sw - pw + cx + s*(i*dw - cx + dx),   py = oh*sh - ph + cy + s*(j*dh - cy + dy)
// Bilinear sample of channel c of group g, v(u, w) = x[n, u, w, g*D + c] inside the image,
// 0 outside; gate = (py > -1 && px > -1 && py < H && px < W) (false for NaN):
//   S = 0 unless gate; else with yl = floor(py), xl = floor(px), ly = py - yl, lx = px - xl:
//   S = (1-ly)(1-lx) v(yl,xl) + (1-ly) lx v(yl,xl+1) + ly (1-lx) v(yl+1,xl) + ly lx v(yl+1,xl+1)
//
// Forward:  y[n, oh, ow, g*D + c] = sum_k m_{q,g,k} * S_{q,g,k,c}   (mask used as given)
//
// Gradients, gy = dL/dy (a tap whose gate fails contributes nothing to any gradient):
//   dL/dmask[q,g,k]  = sum_{c<D} gy[q, g*D+c] * S_{q,g,k,c}
//   dL/ddx[q,g,k]    = s * m * sum_{c<D} gy[q, g*D+c] * dS/dpx
//   dL/ddy[q,g,k]    = s * m * sum_{c<D} gy[q, g*D+c] * dS/dpy
//     dS/dpx = (1-ly)(v(yl,xl+1) - v(yl,xl)) + ly (v(yl+1,xl+1) - v(yl+1,xl))
//     dS/dpy = (1-lx)(v(yl+1,xl) - v(yl,xl)) + lx (v(yl+1,xl+1) - v(yl,xl+1))
//     i.e. the derivative of the interpolant on [floor, floor+1]: at an integer position
//     the one-sided derivative from the floor side, as the official backward.
//   dL/dx[n,u,w,g*D+c] = sum over the gated points (q of batch n, k) of group g with
//     |py-u| < 1, |px-w| < 1 (corners of its cell) of gy[q, g*D+c] * m * (1-|py-u|)(1-|px-w|)
//
// Thread mapping:
//   dcn_fwd: a block item is (a tile of p.pixels_per_item output pixels, a chunk of
//     p.channel_span consecutive channels); thread t owns pixel t / span and channel
//     chunk*span + t % span, so consecutive lanes read consecutive channels of one
//     sampled corner (a coalesced run of D*itemsize bytes per group). The block first
//     stages (py, px, m) of every (pixel, group touched by the chunk, tap) of a tap chunk
//     in shared memory: offsets and mask are read and the sampling point computed ONCE per
//     (pixel, group, tap), not per channel. Shared memory: pixels_per_item *
//     ((span-1)/D + 2) * tap_chunk * 3 accumulators, the tap chunk sized by the host.
//   dcn_bwd_offset: p.reduce_width = min(32, next power of two >= D) lanes per point
//     (q, g, k); lane l sums channels l, l + width, ... in order (consecutive lanes read
//     consecutive channels of each corner and of gy: coalesced), then a shuffle butterfly
//     over the point's lanes (a fixed pattern: deterministic) and lane 0 writes dx, dy and
//     the mask gradient (either destination nullable). The lanes of (g, k) = (0, 0) also
//     zero the pixel's padding channels [pad_channels_begin, off_pixel_stride) (DCNv4).
//   dL/dx, a deterministic gather in two kernels over a chunk of "segments" (n, g),
//     [p.segment_begin, p.segment_begin + p.segment_count):
//     dcn_bwd_input_bin: one block per segment bins its Ho*Wo*K points (point = pix*K + k)
//       by the cell (floor py, floor px) in [-1, H-1] x [-1, W-1] ((H+1)(W+1) cells, plus
//       one bin for gated-off points) with a stable counting sort (common/counting_sort.cuh:
//       count walk in tiles of blockDim, rank among equal keys by comparison, no atomics;
//       exclusive scan; placement walk). Workspace per segment: (H+1)(W+1) + 2 + Ho*Wo*K int64 entries,
//       the host bounds the chunk.
//     dcn_bwd_input: one thread per destination x[n, u, w, g*D + c] of the chunk (c fastest,
//       so lanes read consecutive channels of gy) walks the 4 cells having (u, w) as a
//       corner in fixed order. Cost: the binning reads each point's offset twice (count and
//       placement) and ranks it against the blockDim-1 other points of its tile (O(blockDim)
//       shared-memory compares per point, no atomics); the gather recomputes a point's
//       position and mask for each of the up to 4*D destinations it reaches, so about
//       N*G*Ho*Wo*K*(2*blockDim + 4*D) operations in all, bitwise reproducible. Workspace
//       memory per chunk: segment_count * ((H+1)(W+1) + 2 + Ho*Wo*K) int64 entries.
// Work items are walked with grid-stride loops, so any grid size is valid; index math is
// 64-bit.
#include "common/conv_geometry.cuh"
#include "common/counting_sort.cuh"

// Largest block dcn_bwd_input_bin is launched with (its static shared arrays).
constexpr int DCN_BIN_THREADS = 256;

// Every field is a 64-bit integer so the host can pack it as a flat int64 array
// (in_channels = out_channels = C).
struct DcnParams : ConvGeometryParams {
  long long groups, group_channels;      // G, D
  long long taps, remove_center;         // K, 0/1
  long long offset_scale_bits;           // offset_scale: the bits of a double
  long long off_pixel_stride, off_group_stride;                  // offset addressing
  long long mask_pixel_stride, mask_group_stride, mask_base;     // mask addressing
  long long pad_channels_begin;          // grad_offset channels from here on are zero (DCNv4 padding)
  long long channel_span, pixels_per_item, tap_chunk;            // forward staging
  long long reduce_width;                // offset/mask gradient: lanes per point (power of two <= 32)
  long long segment_begin, segment_count;                        // grad input chunk
};

__device__ __forceinline__ double dcn_offset_scale(const DcnParams& p) {
  union {
    long long bits;
    double value;
  } u;
  u.bits = p.offset_scale_bits;
  return u.value;
}

// Sampling point (py, px) and modulation m of point (q, g, k); q = flattened output pixel.
template <typename T, typename Acc>
__device__ __forceinline__ void dcn_point(const DcnParams& p, const T* offset, const T* mask, index_t q, index_t g,
                                          index_t k, Acc& py, Acc& px, Acc& m) {
  const index_t raw = (p.remove_center && k >= (p.kernel_w / 2) * p.kernel_h + p.kernel_h / 2) ? k + 1 : k;
  const index_t i = raw / p.kernel_h, j = raw % p.kernel_h;  // x index outside
  const index_t ow = q % p.out_w, oh = (q / p.out_w) % p.out_h;
  const index_t cx = (p.dilation_w * (p.kernel_w - 1)) / 2, cy = (p.dilation_h * (p.kernel_h - 1)) / 2;
  const Acc s = Acc(dcn_offset_scale(p));
  const T* off = offset + q * p.off_pixel_stride + g * p.off_group_stride + 2 * k;
  px = Acc(ow * p.stride_w - p.pad_w + cx) + s * (Acc(i * p.dilation_w - cx) + to_acc(off[0]));
  py = Acc(oh * p.stride_h - p.pad_h + cy) + s * (Acc(j * p.dilation_h - cy) + to_acc(off[1]));
  m = to_acc(mask[q * p.mask_pixel_stride + g * p.mask_group_stride + p.mask_base + k]);
}

__device__ __forceinline__ bool dcn_gate(double py, double px, index_t h, index_t w) {
  return py > -1.0 && px > -1.0 && py < double(h) && px < double(w);
}
__device__ __forceinline__ bool dcn_gate(float py, float px, index_t h, index_t w) {
  return py > -1.0f && px > -1.0f && py < float(h) && px < float(w);
}

// The bilinear footprint of a gated point: up to 4 pixel indices (u*W + w, -1 when the
// corner is outside the image) and their weights.
template <typename Acc>
struct DcnCorners {
  index_t idx[4];
  Acc wt[4];
  __device__ DcnCorners(Acc py, Acc px, index_t h, index_t w) {
    const index_t yl = index_t(floor(py)), xl = index_t(floor(px));
    const Acc ly = py - Acc(yl), lx = px - Acc(xl), hy = Acc(1) - ly, hx = Acc(1) - lx;
    const bool top = yl >= 0, bottom = yl + 1 < h, left = xl >= 0, right = xl + 1 < w;
    idx[0] = top && left ? yl * w + xl : -1;
    idx[1] = top && right ? yl * w + xl + 1 : -1;
    idx[2] = bottom && left ? (yl + 1) * w + xl : -1;
    idx[3] = bottom && right ? (yl + 1) * w + xl + 1 : -1;
    wt[0] = hy * hx; wt[1] = hy * lx; wt[2] = ly * hx; wt[3] = ly * lx;
  }
  // image: x + n*H*W*C + channel; pixels are C apart.
  template <typename T>
  __device__ Acc sample(const T* image, index_t channels) const {
    Acc v = Acc(0);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (idx[c] >= 0) v += wt[c] * to_acc(image[idx[c] * channels]);
    return v;
  }
};

template <typename T>
__global__ void dcn_fwd(const DcnParams p, const T* __restrict__ x, const T* __restrict__ offset,
                        const T* __restrict__ mask, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, stage);  // [pixels_per_item][gspan][tap_chunk][3]: (py, px, m)
  const index_t C = p.groups * p.group_channels, D = p.group_channels, K = p.taps;
  const index_t Q = p.batch * p.out_h * p.out_w, image = p.in_h * p.in_w * C;
  const index_t span = p.channel_span, ppi = p.pixels_per_item, tc = p.tap_chunk;
  const index_t gspan = (span - 1) / D + 2;  // groups a chunk of span channels can touch
  const index_t cchunks = ceil_div(C, span), items = ceil_div(Q, ppi) * cchunks;
  const index_t tid = threadIdx.x, ql = tid / span, cl = tid % span;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t cc = item % cchunks, q0 = (item / cchunks) * ppi;
    const index_t c0 = cc * span, g0 = c0 / D;
    const index_t q = q0 + ql, c = c0 + cl;
    const bool active = ql < ppi && c < C && q < Q;
    const index_t g = c / D, gl = g - g0, n = q / (p.out_h * p.out_w);
    Acc acc = Acc(0);
    for (index_t k0 = 0; k0 < K; k0 += tc) {
      const index_t kn = min_index(tc, K - k0);
      __syncthreads();  // the previous stage has been read
      for (index_t e = tid; e < ppi * gspan * kn; e += blockDim.x) {
        const index_t kl = e % kn, g2l = (e / kn) % gspan, q2l = e / (kn * gspan);
        const index_t q2 = q0 + q2l, g2 = g0 + g2l;
        Acc* st = stage + ((q2l * gspan + g2l) * tc + kl) * 3;
        if (q2 < Q && g2 < p.groups) dcn_point(p, offset, mask, q2, g2, k0 + kl, st[0], st[1], st[2]);
      }
      __syncthreads();
      if (active) {
        const T* img = x + n * image + c;
        for (index_t kl = 0; kl < kn; ++kl) {
          const Acc* st = stage + ((ql * gspan + gl) * tc + kl) * 3;
          const Acc py = st[0], px = st[1];
          if (!dcn_gate(py, px, p.in_h, p.in_w)) continue;
          acc += st[2] * DcnCorners<Acc>(py, px, p.in_h, p.in_w).sample(img, C);
        }
      }
    }
    if (active) y[q * C + c] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void dcn_bwd_offset(const DcnParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                               const T* __restrict__ offset, const T* __restrict__ mask,
                               T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
  typedef typename Accumulator<T>::type Acc;
  const index_t C = p.groups * p.group_channels, D = p.group_channels, K = p.taps;
  const index_t points = p.batch * p.out_h * p.out_w * p.groups * K, image = p.in_h * p.in_w * C;
  const int width = int(p.reduce_width);  // lanes per point: a power of two dividing 32
  const index_t per_block = blockDim.x / width, blocks = ceil_div(points, per_block);
  const index_t lane = threadIdx.x % width, slot = threadIdx.x / width;
  for (index_t item = blockIdx.x; item < blocks; item += gridDim.x) {  // uniform per block: shuffles stay converged
    const index_t e = item * per_block + slot;  // = (q*G + g)*K + k
    const bool valid = e < points;
    const index_t k = valid ? e % K : 0, g = valid ? (e / K) % p.groups : 0, q = valid ? e / (K * p.groups) : 0;
    const index_t n = q / (p.out_h * p.out_w);
    if (valid && grad_offset != nullptr && g == 0 && k == 0)  // DCNv4's padding channels: exactly zero
      for (index_t ch = p.pad_channels_begin + lane; ch < p.off_pixel_stride; ch += width)
        grad_offset[q * p.off_pixel_stride + ch] = from_acc<T>(Acc(0));
    Acc py = Acc(0), px = Acc(0), m = Acc(0);
    if (valid) dcn_point(p, offset, mask, q, g, k, py, px, m);
    Acc gdx = Acc(0), gdy = Acc(0), gm = Acc(0);
    if (valid && dcn_gate(py, px, p.in_h, p.in_w)) {
      const index_t yl = index_t(floor(py)), xl = index_t(floor(px));
      const Acc ly = py - Acc(yl), lx = px - Acc(xl);
      const bool top = yl >= 0, bottom = yl + 1 < p.in_h, left = xl >= 0, right = xl + 1 < p.in_w;
      const T* img = x + n * image + g * D;
      const T* gp = grad_y + q * C + g * D;
      // lane l takes channels l, l + width, ...: consecutive lanes read consecutive channels
      // of each corner (coalesced); each lane's sum runs in a fixed order.
      for (index_t c = lane; c < D; c += width) {
        const Acc v00 = top && left ? to_acc(img[(yl * p.in_w + xl) * C + c]) : Acc(0);
        const Acc v01 = top && right ? to_acc(img[(yl * p.in_w + xl + 1) * C + c]) : Acc(0);
        const Acc v10 = bottom && left ? to_acc(img[((yl + 1) * p.in_w + xl) * C + c]) : Acc(0);
        const Acc v11 = bottom && right ? to_acc(img[((yl + 1) * p.in_w + xl + 1) * C + c]) : Acc(0);
        const Acc gc = to_acc(gp[c]);
        gdx += gc * ((Acc(1) - ly) * (v01 - v00) + ly * (v11 - v10));
        gdy += gc * ((Acc(1) - lx) * (v10 - v00) + lx * (v11 - v01));
        gm += gc * ((Acc(1) - ly) * ((Acc(1) - lx) * v00 + lx * v01) + ly * ((Acc(1) - lx) * v10 + lx * v11));
      }
    }
    // butterfly over the point's lanes: a fixed pattern, so the sums are reproducible
    for (int s = width / 2; s > 0; s >>= 1) {
      gdx += __shfl_xor_sync(0xffffffffu, gdx, s, width);
      gdy += __shfl_xor_sync(0xffffffffu, gdy, s, width);
      gm += __shfl_xor_sync(0xffffffffu, gm, s, width);
    }
    if (!valid || lane != 0) continue;
    const Acc sm = Acc(dcn_offset_scale(p)) * m;
    if (grad_offset != nullptr) {
      T* go = grad_offset + q * p.off_pixel_stride + g * p.off_group_stride + 2 * k;
      go[0] = from_acc<T>(sm * gdx);
      go[1] = from_acc<T>(sm * gdy);
    }
    if (grad_mask != nullptr)
      grad_mask[q * p.mask_pixel_stride + g * p.mask_group_stride + p.mask_base + k] = from_acc<T>(gm);
  }
}

// The bin of point (q of segment (n, g), k): its cell (floor py + 1)*(W+1) + floor px + 1
// when gated in, else (H+1)*(W+1), the bin of points that sample nothing.
template <typename T>
__device__ __forceinline__ index_t dcn_point_key(const DcnParams& p, const T* offset, const T* mask, index_t n,
                                                 index_t g, index_t point) {
  typedef typename Accumulator<T>::type Acc;
  const index_t q = n * p.out_h * p.out_w + point / p.taps, k = point % p.taps;
  Acc py, px, m;
  dcn_point(p, offset, mask, q, g, k, py, px, m);
  if (!dcn_gate(py, px, p.in_h, p.in_w)) return (p.in_h + 1) * (p.in_w + 1);
  return (index_t(floor(py)) + 1) * (p.in_w + 1) + index_t(floor(px)) + 1;
}

// starts: [segment_count][cells + 2], order: [segment_count][Ho*Wo*K] (int64 workspaces).
// After the kernel the points of bin b of a segment are order[starts[b] .. starts[b+1]),
// in increasing point index (point = pix*K + k).
template <typename T>
__global__ void dcn_bwd_input_bin(const DcnParams p, const T* __restrict__ offset, const T* __restrict__ mask,
                                  long long* __restrict__ starts, long long* __restrict__ order) {
  __shared__ long long keys[DCN_BIN_THREADS];
  __shared__ long long totals[DCN_BIN_THREADS];
  const index_t points = p.out_h * p.out_w * p.taps;
  const index_t bins = (p.in_h + 1) * (p.in_w + 1) + 1;
  for (index_t item = blockIdx.x; item < p.segment_count; item += gridDim.x) {
    const index_t seg = p.segment_begin + item, n = seg / p.groups, g = seg % p.groups;
    block_counting_sort(
        points, bins, [&](index_t point) { return dcn_point_key(p, offset, mask, n, g, point); },
        starts + item * (bins + 1), order + item * points, keys, totals);
  }
}

template <typename T>
__global__ void dcn_bwd_input(const DcnParams p, const T* __restrict__ grad_y, const T* __restrict__ offset,
                              const T* __restrict__ mask, const long long* __restrict__ starts,
                              const long long* __restrict__ order, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  const index_t C = p.groups * p.group_channels, D = p.group_channels, K = p.taps;
  const index_t plane = p.in_h * p.in_w, pixels = p.out_h * p.out_w, points = pixels * K;
  const index_t bins = (p.in_h + 1) * (p.in_w + 1) + 1;
  const index_t total = p.segment_count * plane * D, blocks = ceil_div(total, blockDim.x);
  for (index_t item = blockIdx.x; item < blocks; item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;  // = (local*plane + pixel)*D + c
    if (e >= total) continue;
    const index_t c = e % D, pixel = (e / D) % plane, local = e / (D * plane);
    const index_t seg = p.segment_begin + local, n = seg / p.groups, g = seg % p.groups;
    const index_t u = pixel / p.in_w, w = pixel % p.in_w;
    const long long* start = starts + local * (bins + 1);
    const long long* ord = order + local * points;
    Acc acc = Acc(0);
    for (index_t cy = u - 1; cy <= u; ++cy)  // the 4 cells with (u, w) as a corner, fixed order
      for (index_t cx = w - 1; cx <= w; ++cx) {
        const index_t key = (cy + 1) * (p.in_w + 1) + cx + 1;
        for (long long b = start[key]; b < start[key + 1]; ++b) {
          const index_t point = ord[b], q = n * pixels + point / K, k = point % K;
          Acc py, px, m;
          dcn_point(p, offset, mask, q, g, k, py, px, m);
          const Acc wy = cy == u ? Acc(1) - (py - Acc(cy)) : py - Acc(cy);
          const Acc wx = cx == w ? Acc(1) - (px - Acc(cx)) : px - Acc(cx);
          acc += to_acc(grad_y[q * C + g * D + c]) * m * (wy * wx);
        }
      }
    grad_x[(n * plane + pixel) * C + g * D + c] = from_acc<T>(acc);
  }
}
