// int8-weight x float32-activation matmul for CPUs, compiled at first use (see grok1/kernels.py).
//
// y[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] * q[n, k]
// q: int8 [N, K] (torch Linear layout), s: bf16 [G, N] (the release's scales: G groups along K),
// x: float32 [M, K]. The int8 weights are converted to float32 in registers, never materialised:
// decode (small M) streams each weight byte once, at memory speed. Large M (prefill) dequantises
// one tile of rows at a time into a cache-resident buffer and hands it to the BLAS GEMM.
// The sum over one group is exact-order-independent up to float rounding, like any GEMM.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 cvt8(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Dot products of MR activation rows with one int8 weight row over [k0, k1).
template <int MR>
inline void dot_rows(const float* x, int64_t ldx, const int8_t* w, int64_t k0, int64_t k1, float* out) {
  int64_t k = k0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (; k + 16 <= k1; k += 16) {
    __m256 w0 = cvt8(w + k), w1 = cvt8(w + k + 8);
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k + 8), w1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int r = 0; r < MR; ++r) out[r] = 0.f;
#endif
  for (; k < k1; ++k)
    for (int r = 0; r < MR; ++r) out[r] += x[r * ldx + k] * static_cast<float>(w[k]);
}

template <int MR>
void gemv_block(const float* x, int64_t ldx, const int8_t* q, const uint16_t* s, float* y, int64_t ldy,
                int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t kg = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    float total[MR] = {0};
    for (int64_t g = 0; g < G; ++g) {
      float part[MR];
      dot_rows<MR>(x, ldx, q + n * K, g * kg, (g + 1) * kg, part);
      const float scale = bf16_to_float(s[g * N + n]);
      for (int r = 0; r < MR; ++r) total[r] += scale * part[r];
    }
    for (int r = 0; r < MR; ++r) y[r * ldy + n] = total[r];
  }
}

// Small M: stream the weights once; rows of x in register blocks of up to 4.
void gemv(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = s.size(0);
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) gemv_block<4>(xp + m * K, K, qp, sp, yp + m * N, N, N, K, G, n0, n1);
    for (; m + 2 <= M; m += 2) gemv_block<2>(xp + m * K, K, qp, sp, yp + m * N, N, N, K, G, n0, n1);
    for (; m < M; ++m) gemv_block<1>(xp + m * K, K, qp, sp, yp + m * N, N, N, K, G, n0, n1);
  });
}

// Large M: dequantise a tile of weight rows (exact float32 products), multiply with BLAS.
void tiled_gemm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, torch::Tensor& y) {
  const int64_t K = x.size(1), N = q.size(0), G = s.size(0), kg = K / G;
  const int64_t tile = std::max<int64_t>(16, (256 * 1024) / (K * 4) / 16 * 16);  // ~256 KB of float32 rows
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  at::parallel_for(0, (N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    torch::Tensor w = torch::empty({tile, K}, x.options());
    float* wp = w.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min(tile, N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* src = qp + (n0 + r) * K;
        float* dst = wp + r * K;
        for (int64_t g = 0; g < G; ++g) {
          const float scale = bf16_to_float(sp[g * N + n0 + r]);
          for (int64_t k = g * kg; k < (g + 1) * kg; ++k) dst[k] = static_cast<float>(src[k]) * scale;
        }
      }
      torch::Tensor out = y.narrow(1, n0, rows);
      at::mm_out(out, x, w.narrow(0, 0, rows).t());
    }
  });
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t gemm_min_rows) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && s.dim() == 2, "int8_linear: x [M,K], q [N,K], s [G,N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && s.scalar_type() == at::kBFloat16,
              "int8_linear: dtypes must be float32, int8, bfloat16");
  TORCH_CHECK(x.size(1) == q.size(1) && s.size(1) == q.size(0) && q.size(1) % s.size(0) == 0,
              "int8_linear: shape mismatch");
  x = x.contiguous();
  q = q.contiguous();
  s = s.contiguous();
  torch::Tensor y = torch::empty({x.size(0), q.size(0)}, x.options());
  if (x.size(0) >= gemm_min_rows) tiled_gemm(x, q, s, y);
  else gemv(x, q, s, y);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ dequant(q, s).T with int8 q [N,K], bf16 scales s [G,N]");
}
