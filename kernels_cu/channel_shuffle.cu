// channel_shuffle: the channel permutation of ShuffleNet (Zhang et al. 2018), with
// torch.nn.functional.channel_shuffle semantics. A pure permutation: every output
// element is a copy of exactly one input element, so the results are bit-exact in
// every dtype and NaN/Inf (payloads included) pass through.
//
// Layout (contiguous; the host flattens every spatial dim into S, as torch reads dim 1
// as the channels and everything after it as spatial):
//   input  [N, C, S]      output [N, C, S]      g = groups, K = C / g
// The channels are viewed as a [g, K] matrix (group i, index j inside the group) and
// transposed to [K, g].
//
// Forward formula (i in [0, g), j in [0, K), s in [0, S)):
//   out[n, j*g + i, s] = in[n, i*K + j, s]
// Gradient: the permutation's adjoint is its inverse, the transpose back from [K, g]
// to [g, K], which is channel_shuffle with K groups:
//   dL/din[n, i*K + j, s] = dL/dout[n, j*g + i, s]   i.e.  dL/din = channel_shuffle(dL/dout, K)
// so this one kernel serves the forward (groups = g) and the backward (groups = K);
// no _bwd kernel exists.
//
// Thread mapping: one thread per OUTPUT element, in the output's own memory order
// (flat index e), gathering the one input element it copies: consecutive threads write
// consecutive addresses (fully coalesced stores), no atomics, deterministic. Within a
// channel plane the loads are consecutive too (the same s run of input channel
// i*K + j), so a warp reads one or two contiguous runs unless S is small (S = 1, e.g.
// after global pooling: then a warp's loads are strided by K, the stores stay
// contiguous). Threads walk the elements with a grid-stride loop, so any grid size is
// valid; all index math is 64-bit.
#include "common/cuconv.cuh"

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct ChannelShuffleParams {
  long long batch;     // N: dim 0
  long long channels;  // C: dim 1
  long long groups;    // g: divides C (the forward's groups, or C / groups for its gradient)
  long long inner;     // S: the product of the spatial dims (dims 2...)
};

// Output [N, C, S], input [N, C, S]: out[n, j*g + i, s] = in[n, i*K + j, s].
template <typename T>
__global__ void channel_shuffle_fwd(const ChannelShuffleParams p, const T* __restrict__ in, T* __restrict__ out) {
  const index_t g = p.groups, per_group = p.channels / g;  // K
  const index_t total = p.batch * p.channels * p.inner;
  const index_t stride = (index_t)gridDim.x * blockDim.x;
  for (index_t e = (index_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
    const index_t row = e / p.inner, s = e - row * p.inner;     // row = n*C + c
    const index_t n = row / p.channels, c = row - n * p.channels;  // output channel c = j*g + i
    const index_t j = c / g, i = c - j * g;
    out[e] = in[(n * p.channels + i * per_group + j) * p.inner + s];
  }
}
