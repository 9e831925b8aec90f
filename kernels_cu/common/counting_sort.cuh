// A stable counting sort of one work item's points by bin, done by one block without
// atomics: the deformable convs' input-gradient binning (deform_conv.cu, dcn.cu), which
// groups the sample points that read each input cell so that the gather pass owns its
// cells.
//
//   keys:  key_of(point) in [0, bins) for point < points
//   after: start[b] .. start[b+1] is bin b's range of out[], start[0] = 0, and out[] holds
//          the points of each bin in increasing point order.
//
// Two walks over the points in tiles of blockDim.x: pass 0 counts bin b into start[b+1],
// pass 1 places. Between them start[b+1] becomes the exclusive prefix of the counts (each
// thread scans a contiguous run of bins, thread 0 scans the runs' totals). In a tile a
// point's rank among equal keys is the number of earlier threads holding its key, and the
// last such thread moves the bin's counter past the tile's points, so the order is fixed
// by the data alone (deterministic).
#pragma once

#include "cuconv.cuh"

// start: [bins + 1], out: [points] (global); keys, totals: [blockDim.x] (shared).
template <typename KeyOf>
__device__ __forceinline__ void block_counting_sort(index_t points, index_t bins, KeyOf key_of, long long* start,
                                                    long long* out, long long* keys, long long* totals) {
  const index_t bd = blockDim.x, tid = threadIdx.x;
  __syncthreads();  // the previous item's walks are over
  for (index_t b = tid; b <= bins; b += bd) start[b] = 0;
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) {
      const index_t run = ceil_div(bins, bd), lo = 1 + tid * run, hi = min_index(lo + run, bins + 1);
      __syncthreads();  // the count walk's last updates are visible
      long long sum = 0;
      for (index_t b = lo; b < hi; ++b) sum += start[b];
      totals[tid] = sum;
      __syncthreads();
      if (tid == 0) {
        long long running = 0;
        for (index_t b = 0; b < bd; ++b) {
          const long long v = totals[b];
          totals[b] = running;
          running += v;
        }
      }
      __syncthreads();
      long long running = totals[tid];
      for (index_t b = lo; b < hi; ++b) {
        const long long v = start[b];
        start[b] = running;
        running += v;
      }
    }
    for (index_t t0 = 0; t0 < points; t0 += bd) {
      const index_t point = t0 + tid, count = min_index(bd, points - t0);
      __syncthreads();  // start[] is settled and keys[] free
      const index_t key = point < points ? key_of(point) : -1;
      keys[tid] = key;
      __syncthreads();
      index_t rank = 0, later = 0;
      if (point < points) {
        for (index_t u = 0; u < tid; ++u) rank += keys[u] == key;
        for (index_t u = tid + 1; u < count; ++u) later += keys[u] == key;
        if (pass == 1) out[start[key + 1] + rank] = point;
      }
      __syncthreads();  // every placement has read start[]
      if (point < points && later == 0) start[key + 1] += rank + 1;
    }
  }
  __syncthreads();  // start[b+1] now ends bin b
}
