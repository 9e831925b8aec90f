// spectral: the pointwise parts of spectral_filter2d (adaptive frequency filters,
// AFFNet) and its gradients. The FFTs themselves run in the FFT library of the
// backend's array module (cuFFT through cupy.fft on the GPU, pocketfft through
// scipy.fft on the host); these kernels are everything between them.
//
// Layout (contiguous; complex numbers are interleaved (re, im) pairs of the
// accumulator type Acc = Accumulator<T>::type, i.e. complex64 for T = __half,
// __nv_bfloat16, float and complex128 for T = double; Wf = W/2 + 1):
//   X  = rfft2(x, norm='ortho')   [B, C, H, Wf] complex (x: [B, C, H, W] real, T)
//   F  filter                     [FB, C, H, Wf] complex, FB = B (per sample) or 1 (shared)
//   Z  = X * F                    [B, C, H, Wf] complex
//   y  = irfft2(Z, s=(H, W), norm='ortho')   [B, C, H, W] real (T)
//   filter index of spectrum element e = (b, c, h, k): e when FB = B, e mod C*H*Wf when FB = 1.
//
// Forward (spectral_filter2d_fwd):  Z[b,c,h,k] = X[b,c,h,k] * F[fb,c,h,k]
//
// Gradients (PyTorch's complex convention: the gradient of a real loss L with respect
// to a complex z is dL/dRe z + i dL/dIm z, what torch autograd returns for a complex
// leaf), with gy = dL/dy and GY = rfft2(gy, norm='ortho') computed on the host:
//   dL/dZ[k]   = s_k * GY[k],  s_k = 2 for 1 <= k < W - Wf + 1 (the columns whose
//                conjugate mirror W - k is not stored: 1..W/2-1 for even W, 1..(W-1)/2
//                for odd W), s_k = 1 for k = 0 and, for even W, the Nyquist column W/2.
//                (torch's irfft backward: rfft of the gradient, the mirrored columns doubled.)
//   dL/dF[fb,c,h,k] = sum_{b -> fb} s_k * GY[b,c,h,k] * conj(X[b,c,h,k])
//                (the sum runs over the whole batch when FB = 1, else over b = fb only)
//                                                      -> spectral_filter2d_bwd_filter
//   dL/dX      = dL/dZ * conj(F), and dL/dx = Re ifft2(zero-pad of dL/dX to width W)
//                (torch's rfft backward). The real part of the zero-padded inverse
//                halves every doubled column again, so
//                dL/dx = irfft2(GY * conj(F), s=(H, W), norm='ortho'):
//                the forward with the conjugate filter -> spectral_filter2d_bwd_input
//                (writes GY * conj(F); the host applies the irfft2).
//
// Dtype conversion (spectral_widen / spectral_narrow): float16 / bfloat16 tensors are
// filtered in float32; these two copy a real tensor T -> Acc before the forward FFT and
// Acc -> T (round to nearest) after the inverse one. They are used by both passes, so
// they carry no _fwd / _bwd suffix. spectral_narrow also writes the float32 / float64
// outputs (then an exact copy into the caller's output array).
//
// Thread mapping: every kernel is elementwise over its output. A block item is
//   blockDim.x consecutive output elements (one per thread, consecutive threads ->
//   consecutive elements: coalesced), walked with a grid-stride loop over items.
//   spectral_filter2d_bwd_filter: one thread owns one filter element and, when the
//   filter is shared (FB = 1), sums over b = 0, 1, ..., B-1 in that fixed order:
//   deterministic, no atomics (the threads of a warp read consecutive elements of each
//   batch's plane, so every step of the loop is coalesced).
// conv2d(algorithm='fft'), depthwise with multiplier 1 (cuconv/ops/spectral.py), reuses
// the three complex kernels on its unnormalised spectra with the weight spectrum as a
// shared filter (FB = 1) and no doubled columns (double_lo = double_hi = 0):
//   y_hat = x_hat * conj(w_hat)                (spectral_filter2d_bwd_input)
//   gx_hat = gy_hat * w_hat                    (spectral_filter2d_fwd)
//   gw_hat = sum_b x_hat[b] * conj(gy_hat[b])  (spectral_filter2d_bwd_filter, fixed batch order)
// In-place use: spectral_filter2d_fwd and _bwd_input may write over their first
// operand (each thread reads its element before writing it), which the host does to
// avoid a second spectrum-sized buffer.
#include "common/cuconv.cuh"

// One struct for every kernel of the file; all fields 64-bit integers.
struct SpectralParams {
  long long batch, channels, height, freq_w;  // the spectrum [batch, channels, height, freq_w], freq_w = W/2 + 1
  long long filter_batch;                     // 1 (one filter shared by the batch) or batch
  long long double_lo, double_hi;             // bwd_filter: columns double_lo <= k < double_hi carry s_k = 2
  long long count;                            // widen / narrow: real elements
};

template <typename R>
struct ComplexValue {  // one complex number, read from / written to an interleaved (re, im) pair
  R re, im;
};

template <typename R>
__device__ __forceinline__ ComplexValue<R> load_complex(const R* base, index_t e) {
  return ComplexValue<R>{base[2 * e], base[2 * e + 1]};
}

template <typename R>
__device__ __forceinline__ void store_complex(R* base, index_t e, R re, R im) {
  base[2 * e] = re;
  base[2 * e + 1] = im;
}

// Elementwise kernels: block item `item` covers elements item*blockDim.x + threadIdx.x.
__device__ __forceinline__ index_t item_count(index_t n) { return ceil_div(n, index_t(blockDim.x)); }

// out = in * F (Conjugate: in * conj(F)), broadcast over the batch when filter_batch = 1.
// out may alias in: each thread reads its element before writing it.
template <bool Conjugate, typename Acc>
__device__ __forceinline__ void multiply_by_filter(const SpectralParams& p, const Acc* in,
                                                   const Acc* __restrict__ filter, Acc* out) {
  const index_t plane = p.channels * p.height * p.freq_w, n = p.batch * plane;
  for (index_t item = blockIdx.x; item < item_count(n); item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;
    if (e >= n) continue;
    const ComplexValue<Acc> a = load_complex(in, e);
    const ComplexValue<Acc> f = load_complex(filter, p.filter_batch == 1 ? e % plane : e);
    if (Conjugate)
      store_complex(out, e, a.re * f.re + a.im * f.im, a.im * f.re - a.re * f.im);
    else
      store_complex(out, e, a.re * f.re - a.im * f.im, a.re * f.im + a.im * f.re);
  }
}

// Z = X * F. out may alias spectrum.
template <typename T>
__global__ void spectral_filter2d_fwd(const SpectralParams p, const typename Accumulator<T>::type* spectrum,
                                      const typename Accumulator<T>::type* __restrict__ filter,
                                      typename Accumulator<T>::type* out) {
  multiply_by_filter<false>(p, spectrum, filter, out);
}

// GY * conj(F): the spectrum whose irfft2 is dL/dx. out may alias grad_spectrum.
template <typename T>
__global__ void spectral_filter2d_bwd_input(const SpectralParams p, const typename Accumulator<T>::type* grad_spectrum,
                                            const typename Accumulator<T>::type* __restrict__ filter,
                                            typename Accumulator<T>::type* out) {
  multiply_by_filter<true>(p, grad_spectrum, filter, out);
}

// dL/dF[fb] = s_k * sum_{b -> fb} GY[b] * conj(X[b]), one thread per filter element.
template <typename T>
__global__ void spectral_filter2d_bwd_filter(const SpectralParams p,
                                             const typename Accumulator<T>::type* __restrict__ grad_spectrum,
                                             const typename Accumulator<T>::type* __restrict__ spectrum,
                                             typename Accumulator<T>::type* __restrict__ grad_filter) {
  typedef typename Accumulator<T>::type Acc;
  const index_t plane = p.channels * p.height * p.freq_w, n = p.filter_batch * plane;
  const bool shared = p.filter_batch == 1;
  for (index_t item = blockIdx.x; item < item_count(n); item += gridDim.x) {
    const index_t e = item * blockDim.x + threadIdx.x;
    if (e >= n) continue;
    Acc re = Acc(0), im = Acc(0);
    // Shared filter: the spectrum elements e, e + plane, ... (b = 0, 1, ..., in order);
    // per-sample filter: the spectrum element e alone.
    const index_t last = shared ? p.batch * plane : e + 1, step = shared ? plane : 1;
    for (index_t s = e; s < last; s += step) {
      const ComplexValue<Acc> g = load_complex(grad_spectrum, s);
      const ComplexValue<Acc> x = load_complex(spectrum, s);
      re += g.re * x.re + g.im * x.im;
      im += g.im * x.re - g.re * x.im;
    }
    const index_t k = e % p.freq_w;
    const Acc scale = (k >= p.double_lo && k < p.double_hi) ? Acc(2) : Acc(1);
    store_complex(grad_filter, e, scale * re, scale * im);
  }
}

// out[i] = in[i] as the accumulator type (exact).
template <typename T>
__global__ void spectral_widen(const SpectralParams p, const T* __restrict__ in,
                               typename Accumulator<T>::type* __restrict__ out) {
  for (index_t item = blockIdx.x; item < item_count(p.count); item += gridDim.x) {
    const index_t i = item * blockDim.x + threadIdx.x;
    if (i < p.count) out[i] = to_acc(in[i]);
  }
}

// out[i] = in[i] rounded to T (to nearest; exact for float / double).
template <typename T>
__global__ void spectral_narrow(const SpectralParams p, const typename Accumulator<T>::type* __restrict__ in,
                                T* __restrict__ out) {
  for (index_t item = blockIdx.x; item < item_count(p.count); item += gridDim.x) {
    const index_t i = item * blockDim.x + threadIdx.x;
    if (i < p.count) out[i] = from_acc<T>(in[i]);
  }
}
