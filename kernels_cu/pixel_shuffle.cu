// pixel_shuffle / pixel_unshuffle: the sub-pixel rearrangement of ESPCN
// (torch.nn.functional.pixel_shuffle / pixel_unshuffle semantics). A pure
// permutation: every output element is a copy of exactly one input element, so the
// results are bit-exact in every dtype and NaN/Inf (payloads included) pass through.
//
// Layout (contiguous; the host flattens any leading dims into N; r = factor):
//   low-resolution side   lo [N, C*r*r, H, W]
//   high-resolution side  hi [N, C, H*r, W*r]
// C, H, W are always the high-resolution channel count and the low-resolution
// height and width, whichever direction a kernel runs.
//
// Forward formulas (i, j in [0, r): the sub-pixel row and column):
//   pixel_shuffle:    hi[n, c, h*r + i, w*r + j] = lo[n, c*r*r + i*r + j, h, w]
//   pixel_unshuffle:  lo[n, c*r*r + i*r + j, h, w] = hi[n, c, h*r + i, w*r + j]
// The two are inverse permutations of each other, and since a permutation's adjoint
// is its inverse, each is the other's gradient:
//   pixel_shuffle backward:   dL/dlo = pixel_unshuffle(dL/dhi)  -> pixel_unshuffle_fwd
//   pixel_unshuffle backward: dL/dhi = pixel_shuffle(dL/dlo)    -> pixel_shuffle_fwd
// so these two kernels serve all four entry points (no _bwd kernels exist).
//
// Thread mapping: one thread per OUTPUT element, in the output's own memory order
// (flat index e), gathering the one input element it copies: consecutive threads
// write consecutive addresses (fully coalesced stores), no atomics, deterministic.
// The loads are what the permutation allows: pixel_shuffle's warp reads r runs of
// consecutive elements (one per sub-pixel column j, from r input planes);
// pixel_unshuffle's warp reads one row with stride r, and the r - 1 sibling output
// planes (other j) read the sectors it skipped. Threads walk the elements with a
// grid-stride loop, so any grid size is valid; all index math is 64-bit.
#include "common/cuconv.cuh"

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct PixelShuffleParams {
  long long batch;     // N: the product of every leading dim (1 for a 3-D input)
  long long channels;  // C: channels on the high-resolution side
  long long height;    // H: low-resolution height
  long long width;     // W: low-resolution width
  long long factor;    // r: the upscale (shuffle) or downscale (unshuffle) factor
};

// Output hi [N, C, H*r, W*r], input lo [N, C*r*r, H, W].
template <typename T>
__global__ void pixel_shuffle_fwd(const PixelShuffleParams p, const T* __restrict__ lo, T* __restrict__ hi) {
  const index_t r = p.factor, out_h = p.height * r, out_w = p.width * r;
  const index_t total = p.batch * p.channels * out_h * out_w;
  const index_t stride = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const index_t row = e / out_w, ox = e - row * out_w;      // row = (n*C + c)*H*r + oy
    const index_t plane = row / out_h, oy = row - plane * out_h;  // plane = n*C + c
    const index_t h = oy / r, i = oy - h * r;
    const index_t w = ox / r, j = ox - w * r;
    // lo channel (n*C + c)*r*r + i*r + j = n*(C*r*r) + c*r*r + i*r + j
    hi[e] = lo[(((plane * r + i) * r + j) * p.height + h) * p.width + w];
  }
}

// Output lo [N, C*r*r, H, W], input hi [N, C, H*r, W*r].
template <typename T>
__global__ void pixel_unshuffle_fwd(const PixelShuffleParams p, const T* __restrict__ hi, T* __restrict__ lo) {
  const index_t r = p.factor, in_h = p.height * r, in_w = p.width * r;
  const index_t total = p.batch * p.channels * r * r * p.height * p.width;
  const index_t stride = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const index_t row = e / p.width, w = e - row * p.width;        // row = lo_channel*H + h
    const index_t channel = row / p.height, h = row - channel * p.height;  // (n*C + c)*r*r + i*r + j
    const index_t plane = channel / (r * r), sub = channel - plane * (r * r);  // plane = n*C + c
    const index_t i = sub / r, j = sub - i * r;
    lo[e] = hi[(plane * in_h + h * r + i) * in_w + w * r + j];
  }
}
