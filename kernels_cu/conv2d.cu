// conv2d: direct 2-D convolution (cross-correlation, torch.nn.functional.conv2d
// semantics), forward and backward. These are the general kernels: correct for
// every shape, stride, padding, dilation and group count; faster specialised paths
// (implicit GEMM on tensor cores, bandwidth-bound depthwise) live elsewhere.
//
// Layout (contiguous NCHW, G = groups, Cin_g = Cin/G, Cout_g = Cout/G):
//   x  [B, Cin, H, W]      w  [Cout, Cin_g, KH, KW]     bias [Cout]
//   y  [B, Cout, Ho, Wo]   (Ho, Wo and the top/left padding come from the host;
//                           'same' padding may be asymmetric, the bottom/right part
//                           is implied by Ho, Wo)
//   With upscale r > 1 (subpixel_conv2d) y and dL/dy are stored pixel-shuffled:
//   conv channel o = c*r*r + i*r + j, pixel (oy, ox) lives at [b, c, oy*r + i, ox*r + j]
//   of a [B, Cout/r^2, Ho*r, Wo*r] tensor (torch's pixel_shuffle order), so the
//   shuffle costs no pass and no intermediate tensor.
//
// Forward, for output channel o in group g = o / Cout_g:
//   y[b,o,oy,ox] = bias[o] + sum_{c<Cin_g, ky, kx} w[o,c,ky,kx] * x[b, g*Cin_g+c, iy, ix]
//   iy = oy*SH - PH + ky*DH,  ix = ox*SW - PW + kx*DW   (terms outside the image are 0)
//
// Gradients, with gy = dL/dy:
//   dL/dx[b,i,iy,ix] = sum_{o in group(i), ky, kx} gy[b,o,oy,ox] * w[o, i - g*Cin_g, ky, kx]
//                      over the (ky,kx) with oy = (iy + PH - ky*DH) / SH an integer in
//                      [0, Ho) (same for ox): a gather, each thread owns one dL/dx.
//   dL/dw[o,c,ky,kx] = sum_{b,oy,ox} gy[b,o,oy,ox] * x[b, g*Cin_g+c, iy, ix]
//   dL/dbias[o]      = sum_{b,oy,ox} gy[b,o,oy,ox]
//
// conv_transpose2d is the adjoint of conv2d, so these kernels serve it too: its
// forward is conv2d_bwd_input (plus its bias) on the conv whose input has the
// transposed output's shape; its input gradient is conv2d_fwd and its weight
// gradient conv2d_bwd_weight on that same conv (cuconv/ops/conv_transpose2d.py).
//
// Thread mapping:
//   conv2d_fwd / conv2d_bwd_input: a block owns blockDim.x consecutive pixels of one
//     (b, channel) plane of the tensor it writes; one thread per pixel. The weights
//     the block needs (one output channel's filter, or one input channel's slice of
//     its group's filters) are the same for every thread, so they are staged through
//     shared memory in chunks of p.chunk (channel, tap) entries.
//   conv2d_bwd_weight / conv2d_bwd_bias: a block owns one weight (bias) element and
//     reduces over B*Ho*Wo with block_reduce_sum: fixed order, no atomics, bitwise
//     reproducible.
// Blocks walk their work items with a grid-stride loop, so any grid size is valid.
#include "common/cuconv.cuh"
#include "common/conv_geometry.cuh"

// Walks the flattened (channel, ky, kx) index of a filter one entry at a time, so the
// inner loops decode it with increments instead of a 64-bit division per term.
struct TapCursor {
  index_t channel, ky, kx, kernel_h, kernel_w;
  __device__ TapCursor(index_t flat, index_t kh, index_t kw) : kernel_h(kh), kernel_w(kw) {
    channel = flat / (kh * kw);
    ky = (flat / kw) % kh;
    kx = flat % kw;
  }
  __device__ void advance() {
    if (++kx < kernel_w) return;
    kx = 0;
    if (++ky < kernel_h) return;
    ky = 0;
    ++channel;
  }
};

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct Conv2dParams : ConvGeometryParams {
  long long groups;
  long long chunk;    // (channel, tap) weight entries staged in shared memory at a time
  long long upscale;  // 1, or the pixel-shuffle factor r of y / dL/dy (subpixel_conv2d)
};

template <typename T>
__global__ void conv2d_fwd(const Conv2dParams p, const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ bias, T* __restrict__ y) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, w_chunk);
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, filter = cin_g * taps;
  const index_t pixels = p.out_h * p.out_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.out_channels * tiles;
  const ConvOutLayout<index_t> out(p);  // y may be pixel-shuffled (upscale > 1)
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*Cout + o
    const index_t o = plane % p.out_channels, b = plane / p.out_channels;
    const index_t pix = tile * blockDim.x + threadIdx.x;
    const bool active = pix < pixels;
    const index_t oy = pix / p.out_w, ox = pix % p.out_w;
    const T* x_group = x + (b * p.in_channels + (o / cout_g) * cin_g) * p.in_h * p.in_w;
    const T* w_filter = w + o * filter;
    Acc acc = bias != nullptr ? to_acc(bias[o]) : Acc(0);
    for (index_t k0 = 0; k0 < filter; k0 += p.chunk) {
      const index_t n = min_index(p.chunk, filter - k0);
      __syncthreads();  // the previous chunk has been consumed by every thread
      for (index_t k = threadIdx.x; k < n; k += blockDim.x) w_chunk[k] = to_acc(w_filter[k0 + k]);
      __syncthreads();
      if (!active) continue;
      // (c, ky, kx) of entry k0 + k, advanced with the loop: no division per term
      TapCursor t(k0, p.kernel_h, p.kernel_w);
      for (index_t k = 0; k < n; ++k, t.advance()) {
        const index_t iy = oy * p.stride_h - p.pad_h + t.ky * p.dilation_h;
        const index_t ix = ox * p.stride_w - p.pad_w + t.kx * p.dilation_w;
        if (iy < 0 || iy >= p.in_h || ix < 0 || ix >= p.in_w) continue;
        acc += w_chunk[k] * to_acc(x_group[(t.channel * p.in_h + iy) * p.in_w + ix]);
      }
    }
    if (active) y[out.at(b, o, oy, ox)] = from_acc<T>(acc);
  }
}

// bias (nullable, [Cin]) is added to every element: zero for conv2d's backward, the
// layer's bias when this kernel is conv_transpose2d's forward.
template <typename T>
__global__ void conv2d_bwd_input(const Conv2dParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                                 const T* __restrict__ bias, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, w_chunk);
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, slice = cout_g * taps;  // (o, tap) pairs reaching one input channel
  const index_t pixels = p.in_h * p.in_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.in_channels * tiles;
  const ConvOutLayout<index_t> gy(p);  // dL/dy may be pixel-shuffled (upscale > 1)
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*Cin + i
    const index_t i = plane % p.in_channels, b = plane / p.in_channels;
    const index_t g = i / cin_g, c = i % cin_g;
    const index_t pix = tile * blockDim.x + threadIdx.x;
    const bool active = pix < pixels;
    const index_t iy = pix / p.in_w, ix = pix % p.in_w;
    Acc acc = bias != nullptr ? to_acc(bias[i]) : Acc(0);
    for (index_t k0 = 0; k0 < slice; k0 += p.chunk) {
      const index_t n = min_index(p.chunk, slice - k0);
      __syncthreads();
      for (index_t k = threadIdx.x; k < n; k += blockDim.x) {
        const index_t o = (k0 + k) / taps, tap = (k0 + k) % taps;
        w_chunk[k] = to_acc(w[((g * cout_g + o) * cin_g + c) * taps + tap]);
      }
      __syncthreads();
      if (!active) continue;
      TapCursor t(k0, p.kernel_h, p.kernel_w);  // t.channel is the output channel within the group
      index_t gy_plane = b * gy.image + gy.channel(g * cout_g + t.channel);
      index_t gy_channel = t.channel;
      for (index_t k = 0; k < n; ++k, t.advance()) {
        const index_t ty = iy + p.pad_h - t.ky * p.dilation_h;
        const index_t tx = ix + p.pad_w - t.kx * p.dilation_w;
        if (ty < 0 || tx < 0 || ty % p.stride_h != 0 || tx % p.stride_w != 0) continue;
        const index_t oy = ty / p.stride_h, ox = tx / p.stride_w;
        if (oy >= p.out_h || ox >= p.out_w) continue;
        if (t.channel != gy_channel) {  // the cursor moved to the next output channel
          gy_plane = b * gy.image + gy.channel(g * cout_g + t.channel);
          gy_channel = t.channel;
        }
        acc += w_chunk[k] * to_acc(grad_y[gy_plane + gy.pixel(oy, ox)]);
      }
    }
    if (active) grad_x[plane * pixels + pix] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void conv2d_bwd_weight(const Conv2dParams p, const T* __restrict__ grad_y, const T* __restrict__ x,
                                  T* __restrict__ grad_w) {
  typedef typename Accumulator<T>::type Acc;
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, out_pixels = p.out_h * p.out_w;
  const index_t n = p.batch * out_pixels;
  const index_t items = p.out_channels * cin_g * taps;
  const ConvOutLayout<index_t> gy(p);  // dL/dy may be pixel-shuffled (upscale > 1)
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tap = item % taps, c = (item / taps) % cin_g, o = item / (taps * cin_g);
    const index_t ky = tap / p.kernel_w, kx = tap % p.kernel_w;
    const index_t i = (o / cout_g) * cin_g + c;
    const index_t gy_channel = gy.channel(o);
    Acc acc = Acc(0);
    for (index_t e = threadIdx.x; e < n; e += blockDim.x) {
      const index_t b = e / out_pixels, pix = e % out_pixels;
      const index_t iy = (pix / p.out_w) * p.stride_h - p.pad_h + ky * p.dilation_h;
      const index_t ix = (pix % p.out_w) * p.stride_w - p.pad_w + kx * p.dilation_w;
      if (iy < 0 || iy >= p.in_h || ix < 0 || ix >= p.in_w) continue;
      acc += to_acc(grad_y[b * gy.image + gy_channel + gy.pixel(pix / p.out_w, pix % p.out_w)]) *
             to_acc(x[((b * p.in_channels + i) * p.in_h + iy) * p.in_w + ix]);
    }
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) grad_w[item] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void conv2d_bwd_bias(const Conv2dParams p, const T* __restrict__ grad_y, T* __restrict__ grad_bias) {
  typedef typename Accumulator<T>::type Acc;
  const index_t out_pixels = p.out_h * p.out_w, n = p.batch * out_pixels;
  const ConvOutLayout<index_t> gy(p);  // dL/dy may be pixel-shuffled (upscale > 1)
  for (index_t o = blockIdx.x; o < p.out_channels; o += gridDim.x) {
    const index_t gy_channel = gy.channel(o);
    Acc acc = Acc(0);
    for (index_t e = threadIdx.x; e < n; e += blockDim.x) {
      const index_t pix = e % out_pixels;
      acc += to_acc(grad_y[(e / out_pixels) * gy.image + gy_channel + gy.pixel(pix / p.out_w, pix % p.out_w)]);
    }
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) grad_bias[o] = from_acc<T>(acc);
  }
}
