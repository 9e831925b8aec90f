// deform_conv: deformable convolution (DCNv1 without mask, DCNv2 with), with
// torchvision.ops.deform_conv2d semantics, forward and every gradient, fused (no
// im2col tensor in device memory) and deterministic by default.
//
// Layout (contiguous NCHW; Gw = weight groups, Go = offset groups, K = KH*KW taps,
// tap t = i*KW + j row-major, P = Ho*Wo output pixels, Cin_g = Cin/Gw, Cout_g = Cout/Gw,
// Cpo = Cin/Go channels per offset group):
//   x      [B, Cin, H, W]            w    [Cout, Cin_g, KH, KW]      bias [Cout]
//   offset [B, Go*2*K, Ho, Wo]       channel g*2K + 2t is dy of tap t, g*2K + 2t + 1 its dx
//   mask   [B, Go*K, Ho, Wo]         channel g*K + t (nullable: DCNv1, mask 1)
//   y      [B, Cout, Ho, Wo]
//   input channel c uses weight group c / Cin_g and offset group c / Cpo (independent).
//
// Sampling, for output pixel p = (oy, ox), tap t = (i, j), offset group g = c / Cpo:
//   Y = oy*SH - PH + i*DH + offset[b, g*2K+2t, oy, ox]
//   X = ox*SW - PW + j*DW + offset[b, g*2K+2t+1, oy, ox]
//   S(x[b,c], Y, X) = 0 unless -1 < Y < H and -1 < X < W; else bilinear over the corners
//     (floor Y, floor Y + 1) x (floor X, floor X + 1), a corner outside the image counting 0:
//     S = sum_{corners (u,v)} (1 - |Y-u|)(1 - |X-v|) x[b,c,u,v]
//   m = mask[b, g*K+t, oy, ox] (1 without mask)
//
// Forward, o in weight group gw = o / Cout_g:
//   y[b,o,p] = bias[o] + sum_{c<Cin_g, t} w[o,c,t] * m(b, g(c'), t, p) * S(x[b,c'], Y, X),  c' = gw*Cin_g + c
//
// Gradients, gy = dL/dy, gcol[b,c',t,p] = sum_{o in group of c'} w[o, c'-gw*Cin_g, t] * gy[b,o,p]
// (computed on the fly, never stored):
//   dL/dbias[o]    = sum_{b,p} gy[b,o,p]
//   dL/dw[o,c,t]   = sum_{b,p} gy[b,o,p] * m * S(x[b,c'], Y, X)
//   dL/dmask[b,g*K+t,p] = sum_{c' in g} gcol[b,c',t,p] * S(x[b,c'], Y, X)
//   dL/doffset_dy  = m * sum_{c' in g} gcol * dS/dY,   dL/doffset_dx = m * sum_{c' in g} gcol * dS/dX
//     dS/dY and dS/dX follow torchvision's get_coordinate_weight: the derivative of the
//     floor-based bilinear formula with NO -1 < Y < H gate, i.e. with yl = floor(Y), xl = floor(X),
//     ly = Y - yl, lx = X - xl and v(u,v) = x[b,c',u,v] inside the image, 0 outside:
//       dS/dY = (1-lx) (v(yl+1,xl) - v(yl,xl)) + lx (v(yl+1,xl+1) - v(yl,xl+1))
//       dS/dX = (1-ly) (v(yl,xl+1) - v(yl,xl)) + ly (v(yl+1,xl+1) - v(yl+1,xl))
//     So at Y = -1 exactly (where S is 0) dS/dY is the right derivative (row 0's interpolant),
//     not 0 (mmcv, DCNv3/v4 gate it to 0); likewise at X = -1.
//   dL/dx[b,c',u,v] = sum over the sample points (t,p) of c' with -1 < Y < H, -1 < X < W and
//     |Y-u| < 1, |X-v| < 1 of gcol[b,c',t,p] * m * (1-|Y-u|)(1-|X-v|)
//
// Thread mapping:
//   deform_conv2d_fwd: a block item is (b, weight group gw, a tile of p.tile consecutive
//     pixels, a chunk of blockDim/tile * OUT_PER_THREAD output channels of gw). Thread
//     (q = tid % tile, s = tid / tile) owns pixel q and OUT_PER_THREAD output channels.
//     For each stage (a chunk of p.channel_chunk input channels x p.tap_chunk taps) the
//     threads sample m*S for every (channel, tap, pixel) of the stage into shared memory
//     (one thread per (tap, pixel) walks the stage's channels and reloads offset/mask and
//     recomputes the corners only when the offset group changes), then contract them with
//     the weights. Shared memory: channel_chunk * tap_chunk * tile * sizeof(Acc) bytes.
//   deform_conv2d_bwd_weight: a block item is (gw, OUT_PER_THREAD output channels, c, t);
//     the block reduces over B*P with block_reduce_sum (one sample feeds OUT_PER_THREAD sums).
//   deform_conv2d_bwd_bias: a block per output channel, block_reduce_sum over B*P
//     (conv_bias_gradient, common/direct_conv.cuh, as conv2d_bwd_bias).
//   deform_conv2d_bwd_offset: one thread per sample point (b, g, t, p) reduces over the Cpo
//     channels of g (and their weight groups' Cout_g output channels): writes dy, dx and
//     the mask gradient. Fixed order, no workspace.
//   dL/dx, deterministic (default), two kernels over a chunk of "segments" (b, g),
//     segments [p.segment_begin, p.segment_begin + p.segment_count):
//     deform_conv2d_bwd_input_bin: one block per segment bins its K*P sample points by the
//       cell (floor Y, floor X) in [-1, H-1] x [-1, W-1] ((H+1)(W+1) cells, plus one bin for
//       points that sample nothing) with a stable counting sort (common/counting_sort.cuh):
//       a count walk over the points in tiles of blockDim (the last thread of each key in a
//       tile adds the tile's count: no atomics), an exclusive scan, and a placement walk
//       (rank within the tile by comparing keys). Workspace per segment: (cells + 2) starts + K*P point indices
//       (int64). The order inside a bin is the point order, so the result is fixed.
//     deform_conv2d_bwd_input: one thread per destination x[b,c',u,v] of the chunk gathers
//       from the 4 cells having (u,v) as a corner, in fixed order: a bitwise reproducible
//       sum (gcol recomputed on the fly per visit).
//   dL/dx, deterministic=False (opt-in): deform_conv2d_bwd_input_atomic, one thread per
//     (b, c', t, p) computes gcol once and atomicAdds its 4 corner terms into an Acc
//     workspace of x's shape (zeroed by deform_conv2d_fill_zero), cast to T by
//     deform_conv2d_cast. Faster, not bitwise reproducible.
// Blocks walk their work items with grid-stride loops, so any grid size is valid.
#include "common/counting_sort.cuh"
#include "common/direct_conv.cuh"

// Output channels one thread accumulates (forward) / one block item reduces (weight grad).
constexpr int DEFORM_OUT_PER_THREAD = 4;
// Largest block deform_conv2d_bwd_input_bin is launched with (its static shared arrays).
constexpr int DEFORM_BIN_THREADS = 256;
// Block size the host launches deform_conv2d_bwd_input_atomic with (the kernel takes any).
constexpr int DEFORM_ATOMIC_THREADS = 256;

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct DeformParams : ConvGeometryParams {
  long long weight_groups, offset_groups;
  long long tile;           // forward: output pixels per block item
  long long channel_chunk;  // forward: input channels per shared-memory stage
  long long tap_chunk;      // forward: taps per shared-memory stage
  long long segment_begin;  // grad input: first (b, g) segment of this chunk
  long long segment_count;  // grad input: segments in this chunk
};

// The sampling position of (tap t, output pixel pix) for the offset group whose offsets
// start at off (offset + (b*Go + g)*2K*P) and the modulation m.
template <typename T, typename Acc>
__device__ __forceinline__ void sample_point(const DeformParams& p, const T* off, const T* msk, index_t t,
                                             index_t pix, Acc& y, Acc& x, Acc& m) {
  const index_t pixels = p.out_h * p.out_w;
  const index_t i = t / p.kernel_w, j = t % p.kernel_w;
  const index_t oy = pix / p.out_w, ox = pix % p.out_w;
  y = Acc(oy * p.stride_h - p.pad_h + i * p.dilation_h) + to_acc(off[(2 * t) * pixels + pix]);
  x = Acc(ox * p.stride_w - p.pad_w + j * p.dilation_w) + to_acc(off[(2 * t + 1) * pixels + pix]);
  m = msk != nullptr ? to_acc(msk[t * pixels + pix]) : Acc(1);
}

// The gated bilinear footprint of (y, x): up to 4 plane offsets with their weights; an
// absent corner has index -1 (weight irrelevant). All absent unless -1 < y < H, -1 < x < W.
template <typename Acc>
struct Footprint {
  index_t idx[4];
  Acc wt[4];
  __device__ Footprint(Acc y, Acc x, index_t h, index_t w) {
    idx[0] = idx[1] = idx[2] = idx[3] = -1;
    wt[0] = wt[1] = wt[2] = wt[3] = Acc(0);
    if (!(y > Acc(-1) && y < Acc(h) && x > Acc(-1) && x < Acc(w))) return;  // also false for NaN
    const index_t yl = index_t(floor(y)), xl = index_t(floor(x));
    const Acc ly = y - Acc(yl), lx = x - Acc(xl), hy = Acc(1) - ly, hx = Acc(1) - lx;
    const bool top = yl >= 0, bottom = yl + 1 < h, left = xl >= 0, right = xl + 1 < w;
    if (top && left) idx[0] = yl * w + xl;
    if (top && right) idx[1] = yl * w + xl + 1;
    if (bottom && left) idx[2] = (yl + 1) * w + xl;
    if (bottom && right) idx[3] = (yl + 1) * w + xl + 1;
    wt[0] = hy * hx; wt[1] = hy * lx; wt[2] = ly * hx; wt[3] = ly * lx;
  }
  template <typename T>
  __device__ Acc sample(const T* plane) const {
    Acc v = Acc(0);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (idx[k] >= 0) v += wt[k] * to_acc(plane[idx[k]]);
    return v;
  }
};

template <typename T>
__global__ void deform_conv2d_fwd(const DeformParams p, const T* __restrict__ x, const T* __restrict__ offset,
                                  const T* __restrict__ mask, const T* __restrict__ w, const T* __restrict__ bias,
                                  T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = DEFORM_OUT_PER_THREAD;
  CUCONV_DYNAMIC_SHARED(Acc, stage);  // [channel_chunk][tap_chunk][tile]
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, plane = p.in_h * p.in_w;
  const index_t cin_g = p.in_channels / p.weight_groups, cout_g = p.out_channels / p.weight_groups;
  const index_t cpo = p.in_channels / p.offset_groups;
  const index_t tile = p.tile, slots = blockDim.x / tile, per_item = slots * R;
  const index_t tiles = ceil_div(pixels, tile), ochunks = ceil_div(cout_g, per_item);
  const index_t items = p.batch * p.weight_groups * tiles * ochunks;
  const index_t q = threadIdx.x % tile, s = threadIdx.x / tile;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t oc = item % ochunks, pt = (item / ochunks) % tiles;
    const index_t gw = (item / (ochunks * tiles)) % p.weight_groups, b = item / (ochunks * tiles * p.weight_groups);
    const index_t pix0 = pt * tile, n_pix = min_index(tile, pixels - pix0);
    const index_t o0 = gw * cout_g + oc * per_item + s * R;  // this thread's first output channel
    const index_t o_end = (gw + 1) * cout_g;
    const bool active = q < n_pix && s < slots && o0 < o_end;
    Acc acc[R];
    const T* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const index_t o = min_index(o0 + r, o_end - 1);  // past the group's end: a duplicate, not stored
      acc[r] = bias != nullptr ? to_acc(bias[o]) : Acc(0);
      wrow[r] = w + o * cin_g * taps;
    }
    for (index_t c0 = 0; c0 < cin_g; c0 += p.channel_chunk) {
      const index_t nc = min_index(p.channel_chunk, cin_g - c0);
      for (index_t t0 = 0; t0 < taps; t0 += p.tap_chunk) {
        const index_t nt = min_index(p.tap_chunk, taps - t0);
        __syncthreads();  // every thread is done with the previous stage
        for (index_t e = threadIdx.x; e < nt * n_pix; e += blockDim.x) {
          const index_t tl = e / n_pix, qq = e % n_pix, t = t0 + tl, pix = pix0 + qq;
          index_t group = -1;
          Acc m = Acc(0);
          Footprint<Acc> fp(Acc(-2), Acc(-2), 1, 1);
          for (index_t cl = 0; cl < nc; ++cl) {
            const index_t c = gw * cin_g + c0 + cl;
            if (c / cpo != group) {  // offsets and mask are shared by the offset group's channels
              group = c / cpo;
              const index_t seg = b * p.offset_groups + group;
              Acc sy, sx;
              sample_point(p, offset + seg * 2 * taps * pixels, mask == nullptr ? mask : mask + seg * taps * pixels,
                           t, pix, sy, sx, m);
              fp = Footprint<Acc>(sy, sx, p.in_h, p.in_w);
            }
            stage[(cl * nt + tl) * tile + qq] = m * fp.sample(x + (b * p.in_channels + c) * plane);
          }
        }
        __syncthreads();
        if (!active) continue;
        for (index_t cl = 0; cl < nc; ++cl)
          for (index_t tl = 0; tl < nt; ++tl) {
            const Acc v = stage[(cl * nt + tl) * tile + q];
            const index_t k = (c0 + cl) * taps + t0 + tl;
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] += to_acc(wrow[r][k]) * v;
          }
      }
    }
    if (active) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (o0 + r < o_end) y[((b * p.out_channels) + o0 + r) * pixels + pix0 + q] = from_acc<T>(acc[r]);
    }
  }
}

template <typename T>
__global__ void deform_conv2d_bwd_weight(const DeformParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                                         const T* __restrict__ offset, const T* __restrict__ mask,
                                         T* __restrict__ grad_w) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = DEFORM_OUT_PER_THREAD;
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, plane = p.in_h * p.in_w;
  const index_t cin_g = p.in_channels / p.weight_groups, cout_g = p.out_channels / p.weight_groups;
  const index_t cpo = p.in_channels / p.offset_groups, ochunks = ceil_div(cout_g, R);
  const index_t n = p.batch * pixels;
  const index_t items = p.weight_groups * ochunks * cin_g * taps;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t t = item % taps, c = (item / taps) % cin_g, oc = (item / (taps * cin_g)) % ochunks;
    const index_t gw = item / (taps * cin_g * ochunks);
    const index_t o0 = gw * cout_g + oc * R, o_end = (gw + 1) * cout_g;
    const index_t ci = gw * cin_g + c, group = ci / cpo;
    Acc acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = Acc(0);
    for (index_t e = threadIdx.x; e < n; e += blockDim.x) {
      const index_t b = e / pixels, pix = e % pixels, seg = b * p.offset_groups + group;
      Acc sy, sx, m;
      sample_point(p, offset + seg * 2 * taps * pixels, mask == nullptr ? mask : mask + seg * taps * pixels, t, pix,
                   sy, sx, m);
      const Acc v = m * Footprint<Acc>(sy, sx, p.in_h, p.in_w).sample(x + (b * p.in_channels + ci) * plane);
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (o0 + r < o_end) acc[r] += to_acc(grad_y[(b * p.out_channels + o0 + r) * pixels + pix]) * v;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const Acc total = block_reduce_sum(acc[r]);
      if (threadIdx.x == 0 && o0 + r < o_end) grad_w[((o0 + r) * cin_g + c) * taps + t] = from_acc<T>(total);
    }
  }
}

template <typename T>
__global__ void deform_conv2d_bwd_bias(const DeformParams p, const T* __restrict__ grad_y, T* __restrict__ grad_bias) {
  conv_bias_gradient(p, ConvOutLayout<index_t>(1, p.out_channels, p.out_h, p.out_w), grad_y, grad_bias);
}

// gcol[b, c, t, pix] = sum over c's weight group's output channels o of w[o, c_local, t] * gy[b, o, pix].
template <typename T, typename Acc>
__device__ __forceinline__ Acc column_gradient(const DeformParams& p, const T* grad_y, const T* w, index_t b,
                                               index_t c, index_t t, index_t pix) {
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w;
  const index_t cin_g = p.in_channels / p.weight_groups, cout_g = p.out_channels / p.weight_groups;
  const index_t gw = c / cin_g, o0 = gw * cout_g;
  const T* wp = w + (o0 * cin_g + (c - gw * cin_g)) * taps + t;
  const T* gp = grad_y + (b * p.out_channels + o0) * pixels + pix;
  Acc acc = Acc(0);
  for (index_t o = 0; o < cout_g; ++o) acc += to_acc(wp[o * cin_g * taps]) * to_acc(gp[o * pixels]);
  return acc;
}

template <typename T>
__global__ void deform_conv2d_bwd_offset(const DeformParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                                         const T* __restrict__ offset, const T* __restrict__ mask,
                                         const T* __restrict__ w, T* __restrict__ grad_offset,
                                         T* __restrict__ grad_mask) {
  typedef typename Accumulator<T>::type Acc;
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, plane = p.in_h * p.in_w;
  const index_t cpo = p.in_channels / p.offset_groups;
  const index_t points = p.batch * p.offset_groups * taps * pixels, blocks = ceil_div(points, blockDim.x);
  for (index_t item = blockIdx.x; item < blocks; item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;  // = (seg * taps + t) * pixels + pix
    if (e >= points) continue;
    const index_t pix = e % pixels, t = (e / pixels) % taps, seg = e / (pixels * taps);
    const index_t b = seg / p.offset_groups, group = seg % p.offset_groups;
    Acc sy, sx, m;
    sample_point(p, offset + seg * 2 * taps * pixels, mask == nullptr ? mask : mask + seg * taps * pixels, t, pix, sy,
                 sx, m);
    // torchvision's coordinate weights: ungated, corners outside the image count 0. Far
    // outside (or NaN) no corner is inside: skip before converting floor() to an integer.
    const bool near = sy > Acc(-2) && sy < Acc(p.in_h + 1) && sx > Acc(-2) && sx < Acc(p.in_w + 1);
    const index_t yl = near ? index_t(floor(sy)) : -2, xl = near ? index_t(floor(sx)) : -2;
    const Acc ly = near ? sy - Acc(yl) : Acc(0), lx = near ? sx - Acc(xl) : Acc(0);
    const bool top = yl >= 0 && yl < p.in_h, bottom = yl + 1 >= 0 && yl + 1 < p.in_h;
    const bool left = xl >= 0 && xl < p.in_w, right = xl + 1 >= 0 && xl + 1 < p.in_w;
    const Footprint<Acc> fp(sy, sx, p.in_h, p.in_w);  // gated, for the mask gradient
    Acc gdy = Acc(0), gdx = Acc(0), gm = Acc(0);
    for (index_t c = group * cpo; c < (group + 1) * cpo; ++c) {
      const Acc gc = column_gradient<T, Acc>(p, grad_y, w, b, c, t, pix);
      const T* xc = x + (b * p.in_channels + c) * plane;
      const Acc v00 = top && left ? to_acc(xc[yl * p.in_w + xl]) : Acc(0);
      const Acc v01 = top && right ? to_acc(xc[yl * p.in_w + xl + 1]) : Acc(0);
      const Acc v10 = bottom && left ? to_acc(xc[(yl + 1) * p.in_w + xl]) : Acc(0);
      const Acc v11 = bottom && right ? to_acc(xc[(yl + 1) * p.in_w + xl + 1]) : Acc(0);
      gdy += gc * ((Acc(1) - lx) * (v10 - v00) + lx * (v11 - v01));
      gdx += gc * ((Acc(1) - ly) * (v01 - v00) + ly * (v11 - v10));
      if (grad_mask != nullptr) gm += gc * fp.sample(xc);
    }
    grad_offset[(seg * 2 * taps + 2 * t) * pixels + pix] = from_acc<T>(m * gdy);
    grad_offset[(seg * 2 * taps + 2 * t + 1) * pixels + pix] = from_acc<T>(m * gdx);
    if (grad_mask != nullptr) grad_mask[(seg * taps + t) * pixels + pix] = from_acc<T>(gm);
  }
}

// The bin of a sample point: its cell (floor Y + 1)*(W+1) + floor X + 1 when -1 < Y < H and
// -1 < X < W, else (H+1)*(W+1), the bin of points that sample nothing.
template <typename T>
__device__ __forceinline__ index_t point_key(const DeformParams& p, const T* off, index_t point) {
  typedef typename Accumulator<T>::type Acc;
  const index_t pixels = p.out_h * p.out_w;
  Acc sy, sx, m;
  sample_point(p, off, (const T*)nullptr, point / pixels, point % pixels, sy, sx, m);
  if (!(sy > Acc(-1) && sy < Acc(p.in_h) && sx > Acc(-1) && sx < Acc(p.in_w))) return (p.in_h + 1) * (p.in_w + 1);
  return (index_t(floor(sy)) + 1) * (p.in_w + 1) + index_t(floor(sx)) + 1;
}

// starts: [segment_count][cells + 2], order: [segment_count][K*P] (int64 workspaces).
// After the kernel, the points of bin k of a segment are order[starts[k] .. starts[k+1]),
// in increasing point index (point = t*P + pix).
template <typename T>
__global__ void deform_conv2d_bwd_input_bin(const DeformParams p, const T* __restrict__ offset,
                                            long long* __restrict__ starts, long long* __restrict__ order) {
  __shared__ long long keys[DEFORM_BIN_THREADS];
  __shared__ long long totals[DEFORM_BIN_THREADS];
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, points = taps * pixels;
  const index_t bins = (p.in_h + 1) * (p.in_w + 1) + 1;
  for (index_t item = blockIdx.x; item < p.segment_count; item += gridDim.x) {
    const T* off = offset + (p.segment_begin + item) * 2 * points;
    block_counting_sort(points, bins, [&](index_t point) { return point_key(p, off, point); },
                        starts + item * (bins + 1), order + item * points, keys, totals);
  }
}

template <typename T>
__global__ void deform_conv2d_bwd_input(const DeformParams p, const T* __restrict__ grad_y,
                                        const T* __restrict__ offset, const T* __restrict__ mask,
                                        const T* __restrict__ w, const long long* __restrict__ starts,
                                        const long long* __restrict__ order, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, plane = p.in_h * p.in_w;
  const index_t points = taps * pixels, bins = (p.in_h + 1) * (p.in_w + 1) + 1;
  const index_t cpo = p.in_channels / p.offset_groups;
  const index_t total = p.segment_count * cpo * plane, blocks = ceil_div(total, blockDim.x);
  for (index_t item = blockIdx.x; item < blocks; item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;  // = (seg_local * cpo + cl) * plane + pixel
    if (e >= total) continue;
    const index_t pixel = e % plane, cl = (e / plane) % cpo, local = e / (plane * cpo);
    const index_t seg = p.segment_begin + local, b = seg / p.offset_groups, group = seg % p.offset_groups;
    const index_t c = group * cpo + cl, u = pixel / p.in_w, v = pixel % p.in_w;
    const T* off = offset + seg * 2 * points;
    const T* msk = mask == nullptr ? mask : mask + seg * points;
    const long long* start = starts + local * (bins + 1);
    const long long* ord = order + local * points;
    Acc acc = Acc(0);
    for (index_t cy = u - 1; cy <= u; ++cy)  // the 4 cells with (u, v) as a corner, fixed order
      for (index_t cx = v - 1; cx <= v; ++cx) {
        const index_t key = (cy + 1) * (p.in_w + 1) + cx + 1;
        for (long long k = start[key]; k < start[key + 1]; ++k) {
          const index_t point = ord[k], t = point / pixels, pix = point % pixels;
          Acc sy, sx, m;
          sample_point(p, off, msk, t, pix, sy, sx, m);
          const Acc wy = cy == u ? Acc(1) - (sy - Acc(cy)) : sy - Acc(cy);
          const Acc wx = cx == v ? Acc(1) - (sx - Acc(cx)) : sx - Acc(cx);
          acc += column_gradient<T, Acc>(p, grad_y, w, b, c, t, pix) * m * (wy * wx);
        }
      }
    grad_x[(b * p.in_channels + c) * plane + pixel] = from_acc<T>(acc);
  }
}

// deterministic=False: scatter with atomics into an Acc workspace of x's shape.
template <typename T>
__global__ void deform_conv2d_bwd_input_atomic(const DeformParams p, const T* __restrict__ grad_y,
                                               const T* __restrict__ offset, const T* __restrict__ mask,
                                               const T* __restrict__ w,
                                               typename Accumulator<T>::type* __restrict__ grad_x_acc) {
  typedef typename Accumulator<T>::type Acc;
  const index_t taps = p.kernel_h * p.kernel_w, pixels = p.out_h * p.out_w, plane = p.in_h * p.in_w;
  const index_t cpo = p.in_channels / p.offset_groups;
  const index_t total = p.batch * p.in_channels * taps * pixels, blocks = ceil_div(total, blockDim.x);
  for (index_t item = blockIdx.x; item < blocks; item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;  // = ((b * Cin + c) * taps + t) * pixels + pix
    if (e >= total) continue;
    const index_t pix = e % pixels, t = (e / pixels) % taps, c = (e / (pixels * taps)) % p.in_channels;
    const index_t b = e / (pixels * taps * p.in_channels), seg = b * p.offset_groups + c / cpo;
    Acc sy, sx, m;
    sample_point(p, offset + seg * 2 * taps * pixels, mask == nullptr ? mask : mask + seg * taps * pixels, t, pix, sy,
                 sx, m);
    const Footprint<Acc> fp(sy, sx, p.in_h, p.in_w);
    if (fp.idx[0] < 0 && fp.idx[1] < 0 && fp.idx[2] < 0 && fp.idx[3] < 0) continue;
    const Acc g = m * column_gradient<T, Acc>(p, grad_y, w, b, c, t, pix);
    Acc* dst = grad_x_acc + (b * p.in_channels + c) * plane;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (fp.idx[k] >= 0) atomicAdd(dst + fp.idx[k], g * fp.wt[k]);
  }
}

// Zeroes the B*Cin*H*W Acc workspace of deform_conv2d_bwd_input_atomic.
template <typename T>
__global__ void deform_conv2d_fill_zero(const DeformParams p, typename Accumulator<T>::type* __restrict__ buffer) {
  const index_t n = p.batch * p.in_channels * p.in_h * p.in_w;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += index_t(gridDim.x) * blockDim.x)
    buffer[e] = 0;
}

// grad_x = the Acc workspace rounded to T.
template <typename T>
__global__ void deform_conv2d_cast(const DeformParams p, const typename Accumulator<T>::type* __restrict__ buffer,
                                   T* __restrict__ grad_x) {
  const index_t n = p.batch * p.in_channels * p.in_h * p.in_w;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += index_t(gridDim.x) * blockDim.x)
    grad_x[e] = from_acc<T>(buffer[e]);
}
