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
//     shared memory in chunks of p.chunk (channel, tap) entries. Both run the skeletons
//     of common/direct_conv.cuh (direct_conv_fwd / direct_conv_bwd_input), which
//     dynamic_conv.cu shares; conv2d_bwd_bias is its conv_bias_gradient.
//   conv2d_bwd_weight / conv2d_bwd_bias: a block owns one weight (bias) element and
//     reduces over B*Ho*Wo with block_reduce_sum: fixed order, no atomics, bitwise
//     reproducible.
// Blocks walk their work items with a grid-stride loop, so any grid size is valid.
#include "common/direct_conv.cuh"

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
  const index_t filter = (p.in_channels / p.groups) * (p.kernel_h * p.kernel_w);
  const ConvOutLayout<index_t> out(p);  // y may be pixel-shuffled (upscale > 1)
  direct_conv_fwd(
      p, p.groups, p.chunk, w_chunk,
      [&](const PlanePixel& q) { return bias != nullptr ? to_acc(bias[q.channel]) : Acc(0); },
      [&](const PlanePixel& q, index_t k) { return to_acc(w[q.channel * filter + k]); },
      [&](Acc& acc, Acc wk, const PlanePixel& q, index_t i, index_t iy, index_t ix) {
        if (iy < 0 || iy >= p.in_h || ix < 0 || ix >= p.in_w) return;  // the padding: no term
        acc += wk * to_acc(x[((q.b * p.in_channels + i) * p.in_h + iy) * p.in_w + ix]);
      },
      [&](const PlanePixel& q, index_t, Acc acc) {
        if (q.active) y[out.at(q.b, q.channel, q.y, q.x)] = from_acc<T>(acc);
      });
}

// bias (nullable, [Cin]) is added to every element: zero for conv2d's backward, the
// layer's bias when this kernel is conv_transpose2d's forward.
template <typename T>
__global__ void conv2d_bwd_input(const Conv2dParams p, const T* __restrict__ grad_y, const T* __restrict__ w,
                                 const T* __restrict__ bias, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  CUCONV_DYNAMIC_SHARED(Acc, w_chunk);
  const index_t cin_g = p.in_channels / p.groups, taps = p.kernel_h * p.kernel_w, pixels = p.in_h * p.in_w;
  direct_conv_bwd_input(
      p, p.groups, p.chunk, ConvOutLayout<index_t>(p), grad_y, w_chunk,  // dL/dy may be pixel-shuffled
      [&](const PlanePixel& q) { return bias != nullptr ? to_acc(bias[q.channel]) : Acc(0); },
      [&](const PlanePixel&, index_t o, index_t c, index_t tap) { return to_acc(w[(o * cin_g + c) * taps + tap]); },
      [&](const PlanePixel& q, index_t, Acc acc) {
        if (q.active) grad_x[q.plane * pixels + q.pix] = from_acc<T>(acc);
      });
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
  conv_bias_gradient(p, ConvOutLayout<index_t>(p), grad_y, grad_bias);  // dL/dy may be pixel-shuffled
}
