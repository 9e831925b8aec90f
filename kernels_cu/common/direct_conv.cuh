// Building blocks of the direct (non-GEMM) convolution kernels, shared by conv2d.cu,
// dynamic_conv.cu and deform_conv.cu: the block-per-plane-tile work item, the skeletons
// of the forward and the input-gradient passes (what differs between the modules, how a
// chunk of weights is staged, how an input term is formed and how the result is written,
// comes in as functors) and the bias-gradient reduction.
#pragma once

#include "cuconv.cuh"
#include "conv_geometry.cuh"

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

// A block item of the direct kernels: blockDim.x consecutive pixels of one (b, channel)
// plane of a [batch, channels, height, width] tensor, one per thread; items run
// plane-major, tile-minor (item = plane * tiles + tile).
struct PlanePixel {
  index_t tile, plane, channel, b;  // plane = b * channels + channel
  index_t pix, y, x;                // this thread's pixel, pix = y * width + x
  bool active;                      // pix < pixels: the plane's last tile may be partial
  __device__ PlanePixel(index_t item, index_t tiles, index_t channels, index_t width, index_t pixels)
      : tile(item % tiles), plane(item / tiles), channel(plane % channels), b(plane / channels),
        pix(tile * blockDim.x + threadIdx.x), y(pix / width), x(pix % width), active(pix < pixels) {}
};

// Entries k0 .. k0 + n - 1 of a block-uniform sequence, value(k), into w_chunk[0 .. n),
// between two barriers (the first: every thread is done with the previous chunk).
template <typename Acc, typename Value>
__device__ __forceinline__ void stage_chunk(Acc* w_chunk, index_t k0, index_t n, Value value) {
  __syncthreads();
  for (index_t k = threadIdx.x; k < n; k += blockDim.x) w_chunk[k] = value(k0 + k);
  __syncthreads();
}

// The forward pass: a block item is a PlanePixel tile of output plane (b, o), o in group
// g = o / Cout_g, one thread per output pixel (oy, ox) = (q.y, q.x):
//   acc = init(q) + sum over k = (c*KH + ky)*KW + kx < Cin_g*KH*KW, in that order, of
//         term(acc, W[k], q, g*Cin_g + c, oy*SH - PH + ky*DH, ox*SW - PW + kx*DW)
// where W[k] = stage(q, k) is the block's filter entry k, computed into shared memory
// (w_chunk, `chunk` entries) `chunk` entries at a time. The functors:
//   init(q) -> Acc                         the start value (a bias, or 0)
//   stage(q, k) -> Acc                     filter entry k of output channel q.channel, sample q.b
//   term(acc, w, q, i, iy, ix)             adds w times the input at channel i, row iy, column ix
//                                          (which may lie in the padding: term decides)
//   epilogue(q, item, acc)                 called by every thread, active or not
template <typename Acc, typename Init, typename Stage, typename Term, typename Epilogue>
__device__ __forceinline__ void direct_conv_fwd(const ConvGeometryParams& p, index_t groups, index_t chunk,
                                                Acc* w_chunk, Init init, Stage stage, Term term,
                                                Epilogue epilogue) {
  const index_t cin_g = p.in_channels / groups, cout_g = p.out_channels / groups;
  const index_t taps = p.kernel_h * p.kernel_w, filter = cin_g * taps;
  const index_t pixels = p.out_h * p.out_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.out_channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const PlanePixel q(item, tiles, p.out_channels, p.out_w, pixels);
    const index_t i0 = (q.channel / cout_g) * cin_g;  // the group's first input channel
    Acc acc = init(q);
    for (index_t k0 = 0; k0 < filter; k0 += chunk) {
      const index_t n = min_index(chunk, filter - k0);
      stage_chunk(w_chunk, k0, n, [&](index_t k) { return stage(q, k); });
      if (!q.active) continue;
      // (c, ky, kx) of entry k0 + k, advanced with the loop: no division per term
      TapCursor t(k0, p.kernel_h, p.kernel_w);
      for (index_t k = 0; k < n; ++k, t.advance()) {
        const index_t iy = q.y * p.stride_h - p.pad_h + t.ky * p.dilation_h;
        const index_t ix = q.x * p.stride_w - p.pad_w + t.kx * p.dilation_w;
        term(acc, w_chunk[k], q, i0 + t.channel, iy, ix);
      }
    }
    epilogue(q, item, acc);
  }
}

// The input gradient, a gather: a block item is a PlanePixel tile of input plane (b, i),
// i = g*Cin_g + c, one thread per input pixel (iy, ix) = (q.y, q.x):
//   acc = init(q) + sum over k = (o*KH + ky)*KW + kx < Cout_g*KH*KW, in that order, of
//         W[k] * gy[b, g*Cout_g + o, oy, ox]
// over the (o, ky, kx) with oy = (iy + PH - ky*DH) / SH an integer in [0, Ho) (the same
// for ox), gy read through the layout `gy` (plain or pixel-shuffled). W[k] = stage(q,
// g*Cout_g + o, c, ky*KW + kx) is weight [output channel, c, tap], computed into shared
// memory `chunk` entries at a time. init and epilogue as in direct_conv_fwd.
template <typename T, typename Acc, typename Init, typename Stage, typename Epilogue>
__device__ __forceinline__ void direct_conv_bwd_input(const ConvGeometryParams& p, index_t groups, index_t chunk,
                                                      const ConvOutLayout<index_t>& gy, const T* __restrict__ grad_y,
                                                      Acc* w_chunk, Init init, Stage stage, Epilogue epilogue) {
  const index_t cin_g = p.in_channels / groups, cout_g = p.out_channels / groups;
  const index_t taps = p.kernel_h * p.kernel_w, slice = cout_g * taps;  // (o, tap) pairs reaching one input channel
  const index_t pixels = p.in_h * p.in_w, tiles = ceil_div(pixels, blockDim.x);
  const index_t items = p.batch * p.in_channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const PlanePixel q(item, tiles, p.in_channels, p.in_w, pixels);
    const index_t g = q.channel / cin_g, c = q.channel % cin_g;
    Acc acc = init(q);
    for (index_t k0 = 0; k0 < slice; k0 += chunk) {
      const index_t n = min_index(chunk, slice - k0);
      stage_chunk(w_chunk, k0, n, [&](index_t k) { return stage(q, g * cout_g + k / taps, c, k % taps); });
      if (!q.active) continue;
      TapCursor t(k0, p.kernel_h, p.kernel_w);  // t.channel is the output channel within the group
      index_t gy_plane = q.b * gy.image + gy.channel(g * cout_g + t.channel);
      index_t gy_channel = t.channel;
      for (index_t k = 0; k < n; ++k, t.advance()) {
        const index_t ty = q.y + p.pad_h - t.ky * p.dilation_h;
        const index_t tx = q.x + p.pad_w - t.kx * p.dilation_w;
        if (ty < 0 || tx < 0 || ty % p.stride_h != 0 || tx % p.stride_w != 0) continue;
        const index_t oy = ty / p.stride_h, ox = tx / p.stride_w;
        if (oy >= p.out_h || ox >= p.out_w) continue;
        if (t.channel != gy_channel) {  // the cursor moved to the next output channel
          gy_plane = q.b * gy.image + gy.channel(g * cout_g + t.channel);
          gy_channel = t.channel;
        }
        acc += w_chunk[k] * to_acc(grad_y[gy_plane + gy.pixel(oy, ox)]);
      }
    }
    epilogue(q, item, acc);
  }
}

// dL/dbias[o] = sum_{b, oy, ox} gy[b, o, oy, ox], gy read through the layout `gy`: a block
// per output channel; each thread sums the elements e = b*Ho*Wo + pixel it strides over in
// order, then block_reduce_sum: a fixed order, no atomics.
template <typename T>
__device__ __forceinline__ void conv_bias_gradient(const ConvGeometryParams& p, const ConvOutLayout<index_t>& gy,
                                                   const T* __restrict__ grad_y, T* __restrict__ grad_bias) {
  typedef typename Accumulator<T>::type Acc;
  const index_t pixels = p.out_h * p.out_w, n = p.batch * pixels;
  for (index_t o = blockIdx.x; o < p.out_channels; o += gridDim.x) {
    const index_t gy_channel = gy.channel(o);
    Acc acc = Acc(0);
    for (index_t e = threadIdx.x; e < n; e += blockDim.x)
      acc += to_acc(grad_y[(e / pixels) * gy.image + gy_channel + gy.flat_pixel(e % pixels, p.out_w)]);
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) grad_bias[o] = from_acc<T>(acc);
  }
}
