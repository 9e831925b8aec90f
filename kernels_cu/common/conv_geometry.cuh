// The geometry every 2-D convolution kernel shares: its shape fields (one definition
// that each module's params struct extends) and where a conv output element lives,
// plain NCHW or pixel-shuffled (subpixel_conv2d).
#pragma once

#include "cuconv.cuh"

// The shape of a 2-D convolution x [batch, in_channels, in_h, in_w] -> y [batch,
// out_channels, out_h, out_w] with a kernel_h x kernel_w filter; pad_h / pad_w are the
// top / left padding (the bottom / right part is implied by out_h, out_w).
//
// A module's params struct derives from it and adds its own fields, all `long long`:
//   struct Conv2dParams : ConvGeometryParams { long long groups, chunk, upscale; };
// Every member is 8 bytes and the base comes first, so the struct's bytes are its flat
// field list (these fields, then the derived ones) under NVRTC and the host compiler
// alike; the host packs it as an int64 array in that order, read from this text by
// cuconv/_kernels.py (KernelModule.param_fields follows `: ConvGeometryParams`).
struct ConvGeometryParams {
  long long batch, in_channels, in_h, in_w;
  long long out_channels, out_h, out_w;
  long long kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// Where the conv output element (b, o, oy, ox) lives in y (a forward writes it) or dL/dy
// (a backward reads it), for an index type I (int where the host proved every offset
// fits 32 bits, else index_t):
//   at(b, o, oy, ox) = b*image + channel(o) + pixel(oy, ox),  pixel(oy, ox) = oy*row + ox*col.
// Upscale r = 1: plain NCHW, channel(o) = o*Ho*Wo, row = Wo, col = 1.
// Upscale r > 1: the pixel-shuffled position [b, o / r^2, oy*r + (o / r) % r, ox*r + o % r]
// of a [B, Cout/r^2, Ho*r, Wo*r] tensor (torch's pixel_shuffle order), so a fused
// subpixel conv needs no shuffle pass and no intermediate tensor:
//   channel(o) = (o / r^2)*r^2*Ho*Wo + ((o / r) % r)*r*Wo + o % r,  row = r^2*Wo,  col = r.
// (image = Cout*Ho*Wo and the formulas above are the same for r = 1.)
//
// Built from the four fields (upscale, out_channels, out_h, out_w), or from any struct that
// has them (a params struct, or a copy of its fields converted to I): each is converted to I.
template <typename I>
struct ConvOutLayout {
  I r;      // upscale
  I plane;  // Ho*Wo
  I image;  // Cout*Ho*Wo: one sample
  I row;    // r^2*Wo: one conv output row
  I col;    // r: one conv output column
  __device__ ConvOutLayout(I upscale, I out_channels, I out_h, I out_w)
      : r(upscale), plane(out_h * out_w), image(out_channels * out_h * out_w), row(upscale * upscale * out_w),
        col(upscale) {}
  template <typename Dims>
  __device__ explicit ConvOutLayout(const Dims& p)
      : ConvOutLayout(I(p.upscale), I(p.out_channels), I(p.out_h), I(p.out_w)) {}

  __device__ I channel(I o) const {
    if (r == 1) return o * plane;
    return (o / (r * r)) * (r * r) * plane + ((o / r) % r) * (row / r) + o % r;  // row / r = r*Wo
  }
  __device__ I pixel(I oy, I ox) const { return oy * row + ox * col; }
  // pixel(pix / out_w, pix % out_w) of a flat conv output pixel pix = oy*Wo + ox (r == 1: pix).
  __device__ I flat_pixel(I pix, I out_w) const { return r == 1 ? pix : pixel(pix / out_w, pix % out_w); }
  __device__ I at(I b, I o, I oy, I ox) const { return b * image + channel(o) + pixel(oy, ox); }

  // channel(o) for a walk of o by small steps, without division: off = channel(o), and for
  // r > 1 o's two low base-r digits j = o % r, i = (o / r) % r. advance(w, d), 0 <= d <= 2,
  // is o += d by compare-and-carry: j + d <= r + 1 < 2r for r >= 2, so each digit carries
  // at most once (r == 1: off = o*plane, no digits).
  struct Walk {
    I off, j, i;
  };
  __device__ Walk walk(I o) const { return Walk{channel(o), o % r, (o / r) % r}; }
  __device__ __forceinline__ void advance(Walk& w, I d) const {
    if (r == 1) {
      w.off += d * plane;
      return;
    }
    w.j += d;
    w.off += d;  // o % r contributes 1 per unit
    if (w.j >= r) {
      w.j -= r;
      w.off += row / r - r;  // (o / r) % r contributes r*Wo per unit
      if (++w.i >= r) {
        w.i -= r;
        w.off += r * r * plane - r * (row / r);  // o / r^2 contributes r^2*Ho*Wo per unit
      }
    }
  }
};
