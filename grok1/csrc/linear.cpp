// Weight-only low-precision matmul for CPUs, compiled at first use (see grok1/kernels.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], x float32 [M, K], W [N, K] stored in one of four formats:
//   int8  q int8 [N, K], scales bf16 [G, N]: W[n, k] = q[n, k] * s[k / (K / G), n]  (the release)
//   int4  q uint8 [N, K / 2], scales bf16 [N, K / 32]: blocks of 32 inputs, byte j of a block holds
//         input j in its low nibble and input j + 16 in its high nibble, values stored + 8
//   bf16  w bf16 [N, K];  fp32  w float32 [N, K]
// Weights are converted to float32 in registers, never materialised whole: decode (small M)
// streams each weight byte once, at memory speed. Large M (prefill) dequantises one tile of
// rows at a time into a cache-resident buffer and hands it to the BLAS GEMM.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <exception>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#endif

namespace {

enum class Fmt { I8, I4, BF16, F32 };

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Weights {
  Fmt fmt;
  const void* w;  // row n starts at w + n * row_bytes
  int64_t row_bytes;
  const uint16_t* s;  // scales (int8, int4), else nullptr
  int64_t N, K, G;  // G: scale groups along K (int8: 1..K; int4: K / 32; else 1)
};

inline float scale_of(const Weights& W, int64_t n, int64_t g) {
  if (W.fmt == Fmt::I8) return bf16_to_float(W.s[g * W.N + n]);
  if (W.fmt == Fmt::I4) return bf16_to_float(W.s[n * W.G + g]);
  return 1.f;
}

inline float weight_at(const Weights& W, int64_t n, int64_t k) {  // scalar, unscaled
  const auto* row = static_cast<const uint8_t*>(W.w) + n * W.row_bytes;
  switch (W.fmt) {
    case Fmt::I8: return static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
    case Fmt::I4: {
      const int64_t b = k / 32, j = k % 32;
      const uint8_t byte = row[b * 16 + (j & 15)];
      return static_cast<float>((j < 16 ? byte & 15 : byte >> 4)) - 8.f;
    }
    case Fmt::BF16: return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
    case Fmt::F32: return reinterpret_cast<const float*>(row)[k];
  }
  return 0.f;
}

#ifdef GROK1_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 16 consecutive weights of row `row` starting at input k (k % 16 == 0), as two float32 vectors.
template <Fmt F>
inline void load16(const uint8_t* row, int64_t k, __m256& a, __m256& b) {
  if constexpr (F == Fmt::I8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  } else if constexpr (F == Fmt::I4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k / 32) * 16));
    const __m128i nib = (k % 32 == 0) ? _mm_and_si128(bytes, _mm_set1_epi8(15))
                                      : _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    const __m256i eight = _mm256_set1_epi32(8);
    a = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), eight));
    b = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)), eight));
  } else if constexpr (F == Fmt::BF16) {
    const auto* p = reinterpret_cast<const __m128i*>(row + 2 * k);
    a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p + 1)), 16));
  } else {
    const float* p = reinterpret_cast<const float*>(row) + k;
    a = _mm256_loadu_ps(p);
    b = _mm256_loadu_ps(p + 8);
  }
}
#endif

// out[r] = sum_k x[r, k] * W[n, k] (scaled) for MR rows of x.
template <int MR, Fmt F>
inline void row_dots(const float* x, int64_t ldx, const Weights& W, int64_t n, float* out) {
  const auto* row = static_cast<const uint8_t*>(W.w) + n * W.row_bytes;
  const int64_t kg = W.K / W.G;
  for (int r = 0; r < MR; ++r) out[r] = 0.f;
  for (int64_t g = 0; g < W.G; ++g) {
    const int64_t k0 = g * kg, k1 = k0 + kg;
    float part[MR];
    int64_t k = k0;
#ifdef GROK1_AVX2
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (; k + 16 <= k1; k += 16) {
      __m256 w0, w1;
      load16<F>(row, k, w0, w1);
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k + 8), w1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) part[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < MR; ++r) part[r] = 0.f;
#endif
    for (; k < k1; ++k) {
      const float w = weight_at(W, n, k);
      for (int r = 0; r < MR; ++r) part[r] += x[r * ldx + k] * w;
    }
    const float s = scale_of(W, n, g);
    for (int r = 0; r < MR; ++r) out[r] += s * part[r];
  }
}

// One activation row against NR weight rows at once (decode): NR independent weight streams and
// accumulator chains, each activation vector loaded once for all of them.
template <int NR, Fmt F>
inline void rows_dot(const float* x, const Weights& W, int64_t n, float* out) {
  const int64_t kg = W.K / W.G;
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = static_cast<const uint8_t*>(W.w) + (n + j) * W.row_bytes, out[j] = 0.f;
  for (int64_t g = 0; g < W.G; ++g) {
    const int64_t k0 = g * kg, k1 = k0 + kg;
    float part[NR];
    int64_t k = k0;
#ifdef GROK1_AVX2
    __m256 acc[NR][2];
    for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (; k + 16 <= k1; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int j = 0; j < NR; ++j) {
        __m256 w0, w1;
        load16<F>(rows[j], k, w0, w1);
        acc[j][0] = _mm256_fmadd_ps(x0, w0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(x1, w1, acc[j][1]);
      }
    }
    for (int j = 0; j < NR; ++j) part[j] = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
#else
    for (int j = 0; j < NR; ++j) part[j] = 0.f;
#endif
    for (; k < k1; ++k)
      for (int j = 0; j < NR; ++j) part[j] += x[k] * weight_at(W, n + j, k);
    for (int j = 0; j < NR; ++j) out[j] += scale_of(W, n + j, g) * part[j];
  }
}

template <Fmt F>
void gemv_rows(const float* x, int64_t M, const Weights& W, float* y, int64_t n0, int64_t n1) {
  const int64_t K = W.K, N = W.N;
  int64_t m = 0;
  float out[4];
  for (; m + 4 <= M; m += 4)
    for (int64_t n = n0; n < n1; ++n) {
      row_dots<4, F>(x + m * K, K, W, n, out);
      for (int r = 0; r < 4; ++r) y[(m + r) * N + n] = out[r];
    }
  for (; m + 2 <= M; m += 2)
    for (int64_t n = n0; n < n1; ++n) {
      row_dots<2, F>(x + m * K, K, W, n, out);
      for (int r = 0; r < 2; ++r) y[(m + r) * N + n] = out[r];
    }
  for (; m < M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      rows_dot<4, F>(x + m * K, W, n, out);
      for (int j = 0; j < 4; ++j) y[m * N + n + j] = out[j];
    }
    for (; n < n1; ++n) {
      row_dots<1, F>(x + m * K, K, W, n, out);
      y[m * N + n] = out[0];
    }
  }
}

#ifndef CHUNK_KB
#define CHUNK_KB 512
#endif

// Small M: stream the weights once, in dynamic chunks (up to CHUNK_KB) so that on a shared machine a
// descheduled thread's work is taken over instead of stalling the call at the barrier.
void gemv(const float* x, int64_t M, const Weights& W, float* y) {
  // Large chunks keep each thread's reads sequential for the prefetchers; at least 4 chunks per thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_bytes = (CHUNK_KB * 1024) / std::max<int64_t>(W.row_bytes, 1);
  const int64_t chunk = std::max<int64_t>(4, std::min(by_bytes, (W.N + 4 * threads - 1) / (4 * threads)));
  const int64_t n_chunks = (W.N + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(W.N, n0 + chunk);
    switch (W.fmt) {
      case Fmt::I8: gemv_rows<Fmt::I8>(x, M, W, y, n0, n1); break;
      case Fmt::I4: gemv_rows<Fmt::I4>(x, M, W, y, n0, n1); break;
      case Fmt::BF16: gemv_rows<Fmt::BF16>(x, M, W, y, n0, n1); break;
      case Fmt::F32: gemv_rows<Fmt::F32>(x, M, W, y, n0, n1); break;
    }
  }
}

// Large M: dequantise a tile of weight rows (exact float32 products), multiply with BLAS.
void tiled_gemm(const torch::Tensor& x, const Weights& W, torch::Tensor& y) {
  const int64_t K = W.K, N = W.N, kg = K / W.G;
  const int64_t tile = std::max<int64_t>(16, (256 * 1024) / (K * 4) / 16 * 16);  // ~256 KB of float32 rows
  const int64_t n_tiles = (N + tile - 1) / tile;
  const at::ThreadLocalState state;  // inference mode, grad mode...: worker threads must see the caller's
  std::exception_ptr error;
#pragma omp parallel num_threads(at::get_num_threads()) if (n_tiles > 1)
  {
    at::ThreadLocalStateGuard guard(state);
    try {
      torch::Tensor buf = torch::empty({tile, K}, x.options());
      float* wp = buf.data_ptr<float>();
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t n0 = t * tile, rows = std::min(tile, N - n0);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t g = 0; g < W.G; ++g) {
            const float s = scale_of(W, n0 + r, g);
            for (int64_t k = g * kg; k < (g + 1) * kg; ++k) wp[r * K + k] = weight_at(W, n0 + r, k) * s;
          }
        torch::Tensor out = y.narrow(1, n0, rows);
        at::mm_out(out, x, buf.narrow(0, 0, rows).t());
      }
    } catch (...) {  // an exception must not leave an OpenMP region: keep it and rethrow outside
#pragma omp critical
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

// y = x @ W.T for x float32 [M, K]; w and scales as described at the top (scales unused for bf16/fp32).
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t gemm_min_rows) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat, "linear: x float32 [M, K], w 2-D");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t K = x.size(1), N = w.size(0);
  Weights W{Fmt::F32, w.data_ptr(), 0, nullptr, N, K, 1};
  switch (w.scalar_type()) {
    case at::kChar:
      TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N && K % scales.size(0) == 0, "int8: scales [G, N]");
      W.fmt = Fmt::I8, W.row_bytes = K, W.G = scales.size(0);
      break;
    case at::kByte:
      TORCH_CHECK(K % 32 == 0 && w.size(1) == K / 2, "int4: w [N, K / 2] packed, K a multiple of 32");
      TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / 32, "int4: scales [N, K / 32]");
      W.fmt = Fmt::I4, W.row_bytes = K / 2, W.G = K / 32;
      break;
    case at::kBFloat16: W.fmt = Fmt::BF16, W.row_bytes = 2 * K; break;
    case at::kFloat: W.fmt = Fmt::F32, W.row_bytes = 4 * K; break;
    default: TORCH_CHECK(false, "linear: weights must be int8, uint8 (int4), bfloat16 or float32");
  }
  if (W.fmt != Fmt::I4) TORCH_CHECK(w.size(1) == K, "linear: w must be [N, K] with K = x.size(1)");
  torch::Tensor s_c;
  if (W.fmt == Fmt::I8 || W.fmt == Fmt::I4) {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16, "linear: scales must be bfloat16");
    s_c = scales.contiguous();
    W.s = reinterpret_cast<const uint16_t*>(s_c.data_ptr<at::BFloat16>());
  }
  torch::Tensor y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) >= gemm_min_rows) tiled_gemm(x, W, y);
  else gemv(x.data_ptr<float>(), x.size(0), W, y.data_ptr<float>());
  return y;
}

// All experts of one MoE layer in one call. x [R, D] holds the (token, slot) rows sorted by expert,
// counts[e] of them for expert e; returns y [R, D] with y_e = (gelu_tanh(x_e W1e^T) * (x_e W3e^T)) W2e^T.
// The same matmuls as calling `linear` per expert from Python, without the per-expert Python overhead.
torch::Tensor experts(torch::Tensor x, std::vector<int64_t> counts, torch::Tensor w1, torch::Tensor s1,
                      torch::Tensor w3, torch::Tensor s3, torch::Tensor w2, torch::Tensor s2, int64_t gemm_min_rows) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && static_cast<int64_t>(counts.size()) == w1.size(0),
              "experts: x [R, D], w [E, ., .], one count per expert");
  x = x.contiguous();
  torch::Tensor y = torch::empty({x.size(0), w2.size(1)}, x.options());
  auto pick = [](const torch::Tensor& s, int64_t e) { return s.numel() ? s.select(0, e) : s; };
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    torch::Tensor xe = x.narrow(0, start, n);
    torch::Tensor h = linear(xe, w1.select(0, e), pick(s1, e), gemm_min_rows);
    torch::Tensor u = linear(xe, w3.select(0, e), pick(s3, e), gemm_min_rows);
    float* hp = h.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    const float k = 0.7978845608028654f;  // sqrt(2 / pi): the tanh approximation of GELU
    for (int64_t i = 0, len = h.numel(); i < len; ++i) {
      const float v = hp[i];
      hp[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v))) * up[i];
    }
    y.narrow(0, start, n).copy_(linear(h, w2.select(0, e), pick(s2, e), gemm_min_rows));
    start += n;
  }
  TORCH_CHECK(start == x.size(0), "experts: counts must add up to the rows of x");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ W.T with W int8 (+scales), packed int4 (+scales), bf16 or fp32");
  m.def("experts", &experts, "all experts of one MoE layer on rows sorted by expert");
}
