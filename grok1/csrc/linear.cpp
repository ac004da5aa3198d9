// Weight-only low-precision matmul for CPUs, compiled at first use (see grok1/kernels.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], x float32 [M, K], W [N, K] stored in one of four formats:
//   int8  q int8 [N, K], scales bf16 [G, N]: W[n, k] = q[n, k] * s[k / (K / G), n]  (the release)
//   int4  q uint8 [N, K / 2], scales bf16 [N, K / 32]: blocks of 32 inputs, byte j of a block holds
//         input j in its low nibble and input j + 16 in its high nibble, values stored + 8
//   bf16  w bf16 [N, K];  fp32  w float32 [N, K]
//   panels  w int8, bf16 or float32 [ceil(N / 16), K, 16], int8 with scales float32 [G, 16 ceil(N / 16)]: see
//         panels.cpp (every M goes through its kernel)
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
#include "simd.h"

void panel_matmul(const float* x, int64_t M, const void* w, at::ScalarType type, const float* s, int64_t N, int64_t K,
                  int64_t G, int64_t P, float* y);  // panels.cpp

namespace {

enum class Fmt { I8, I4, BF16, F32, PANELS };

using grok1::bf16_to_float;

struct Weights {
  Fmt fmt;
  const void* w;  // row n starts at w + n * row_bytes (panels: see panels.cpp)
  int64_t row_bytes;
  const uint16_t* s;  // scales (int8, int4), else nullptr
  int64_t N, K, G;  // G: scale groups along K (int8: 1..K; int4: K / 32; else 1)
  int64_t bytes;  // the whole matrix (to step through a stack of experts)
  const float* sf = nullptr;  // panels: float32 scales [G, 16 P] (int8), else nullptr
  int64_t P = 0;  // panels: number of panels
  at::ScalarType panel_type = at::kFloat;  // panels: int8 (kChar), bf16 or float32
};

inline float scale_of(const Weights& W, int64_t n, int64_t g) {
  if (W.fmt == Fmt::I8) return bf16_to_float(W.s[g * W.N + n]);
  if (W.fmt == Fmt::I4) return bf16_to_float(W.s[n * W.G + g]);
  return 1.f;
}

template <Fmt F>
inline float weight_at(const uint8_t* row, int64_t k) {  // scalar, unscaled
  if constexpr (F == Fmt::I8) {
    return static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
  } else if constexpr (F == Fmt::I4) {
    const int64_t b = k / 32, j = k % 32;
    const uint8_t byte = row[b * 16 + (j & 15)];
    return static_cast<float>((j < 16 ? byte & 15 : byte >> 4)) - 8.f;
  } else if constexpr (F == Fmt::BF16) {
    return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
  } else {
    return reinterpret_cast<const float*>(row)[k];
  }
}

inline float weight_at(const Weights& W, int64_t n, int64_t k) {  // scalar, unscaled
  const auto* row = static_cast<const uint8_t*>(W.w) + n * W.row_bytes;
  switch (W.fmt) {
    case Fmt::I8: return weight_at<Fmt::I8>(row, k);
    case Fmt::I4: return weight_at<Fmt::I4>(row, k);
    case Fmt::BF16: return weight_at<Fmt::BF16>(row, k);
    case Fmt::F32: return weight_at<Fmt::F32>(row, k);
    case Fmt::PANELS: break;  // never read one weight at a time
  }
  return 0.f;
}

// ---- 8-lane float vectors: AVX2 registers, or plain arrays elsewhere (same arithmetic per lane) ----
#ifdef GROK1_AVX2
struct V8 { __m256 v; };
inline V8 v_zero() { return {_mm256_setzero_ps()}; }
inline V8 v_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void v_store(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 v_set1(float s) { return {_mm256_set1_ps(s)}; }
inline V8 v_fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
#else
struct V8 { float f[8]; };
inline V8 v_zero() { return V8{}; }
inline V8 v_load(const float* p) { V8 r; std::memcpy(r.f, p, sizeof r.f); return r; }
inline void v_store(float* p, V8 a) { std::memcpy(p, a.f, sizeof a.f); }
inline V8 v_set1(float s) { V8 r; for (float& f : r.f) f = s; return r; }
inline V8 v_fma(V8 a, V8 b, V8 c) { for (int i = 0; i < 8; ++i) c.f[i] = std::fma(a.f[i], b.f[i], c.f[i]); return c; }
#endif

// 8 unscaled weights of a row, inputs k..k+7 (int4: k % 8 == 0). Reads stay inside the row's bytes.
template <Fmt F>
inline V8 load8(const uint8_t* row, int64_t k) {
#ifdef GROK1_AVX2
  if constexpr (F == Fmt::I8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))};
  } else if constexpr (F == Fmt::I4) {
    const int64_t j = k & 31;
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (k >> 5) * 16 + (j & 15)));
    const __m128i nib = j < 16 ? _mm_and_si128(bytes, _mm_set1_epi8(15))
                               : _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    return {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8)))};
  } else if constexpr (F == Fmt::BF16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))};
  } else {
    return {_mm256_loadu_ps(reinterpret_cast<const float*>(row) + k)};
  }
#else
  V8 r;
  for (int i = 0; i < 8; ++i) r.f[i] = weight_at<F>(row, k + i);
  return r;
#endif
}

// load8, but lanes past the end of the row (input K and beyond) read as 0.
template <Fmt F>
inline V8 load8_tail(const uint8_t* row, int64_t k, int64_t K) {
  if (k + 8 <= K) return load8<F>(row, k);
  alignas(32) float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = k + i < K ? weight_at<F>(row, k + i) : 0.f;
  return v_load(tmp);
}

#ifdef GROK1_AVX2
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

#ifdef GROK1_AVX512
// load16 in one 16-lane register (lanes 0-7 = a, 8-15 = b).
template <Fmt F>
inline __m512 load16x(const uint8_t* row, int64_t k) {
  if constexpr (F == Fmt::I8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
  } else if constexpr (F == Fmt::I4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k / 32) * 16));
    const __m128i nib = (k % 32 == 0) ? _mm_and_si128(bytes, _mm_set1_epi8(15))
                                      : _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(nib), _mm512_set1_epi32(8)));
  } else if constexpr (F == Fmt::BF16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
}
#endif
#endif

// y[m, n] = sum_k x[m, k] * W[n, k] for a block of MR activation rows x NR weight rows: each weight
// vector converted once for the MR rows, each activation vector loaded once for the NR weight rows.
// Every (m, n) is computed in the same order whatever the block shape:
//   hsum(sum_g s_g * (acc0_g + acc1_g)) + sum_g s_g * tail_g
// (acc0/acc1: 8-lane partial sums over the group's inputs in steps of 16, then one step of 8 into acc0, then
// the group's last 1..7 inputs into acc0 (an 8-wide step whose extra lanes see zero activations); tail_g:
// only without AVX2, or for groups of fewer than 8 inputs). So a row of activations gets bit-identical results
// whatever other rows share the call: batching does not change outputs. Scales are applied per group
// as a vector, not after a horizontal sum per group: groups are cheap (int4 has one per 32 inputs).
template <int MR, int NR, Fmt F>
inline void dots(const float* x, int64_t ldx, const Weights& W, int64_t n, float* y, int64_t ldy) {
  const int64_t kg = W.K / W.G;
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = static_cast<const uint8_t*>(W.w) + (n + j) * W.row_bytes;
  float tail_tot[MR][NR] = {};
#ifdef GROK1_AVX2
  __m256 tot[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) tot[r][j] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < W.G; ++g) {
    const int64_t k0 = g * kg, k1 = k0 + kg;
    float s[NR];
    for (int j = 0; j < NR; ++j) s[j] = scale_of(W, n + j, g);
    int64_t k = k0;
#ifdef GROK1_AVX2
    __m256 acc[MR][NR][2];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
#ifdef GROK1_AVX512
    // The same arithmetic in 16-lane registers: lanes 0-7 are acc[..][0], lanes 8-15 acc[..][1], so the
    // results are bit-identical to the AVX2 loop below, with half the instructions. Only for groups of a
    // multiple of 16 inputs (else most 64-byte activation loads would straddle two cache lines).
    if (kg % 16 == 0) {
      __m512 acc16[MR][NR];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NR; ++j) acc16[r][j] = _mm512_setzero_ps();
      for (; k + 16 <= k1; k += 16) {
        __m512 xv[MR];  // each activation vector loaded once per step (32 registers: no spills)
        for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(x + r * ldx + k);
        for (int j = 0; j < NR; ++j) {
          const __m512 w = load16x<F>(rows[j], k);
          for (int r = 0; r < MR; ++r) acc16[r][j] = _mm512_fmadd_ps(xv[r], w, acc16[r][j]);
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NR; ++j) {
          acc[r][j][0] = _mm512_castps512_ps256(acc16[r][j]);
          acc[r][j][1] = _mm512_extractf32x8_ps(acc16[r][j], 1);
        }
    }
#endif
    for (; k + 16 <= k1; k += 16)
      for (int j = 0; j < NR; ++j) {  // one weight vector pair live at a time: no spills with 16 registers
        __m256 w0, w1;
        load16<F>(rows[j], k, w0, w1);
        for (int r = 0; r < MR; ++r) {
          acc[r][j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), w0, acc[r][j][0]);
          acc[r][j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k + 8), w1, acc[r][j][1]);
        }
      }
    if (F != Fmt::I4 && k + 8 <= k1) {  // a group that is not a multiple of 16 inputs: one 8-wide step
      __m256 w[NR];
      for (int j = 0; j < NR; ++j) w[j] = load8<F>(rows[j], k).v;
      for (int r = 0; r < MR; ++r) {
        const __m256 x0 = _mm256_loadu_ps(x + r * ldx + k);
        for (int j = 0; j < NR; ++j) acc[r][j][0] = _mm256_fmadd_ps(x0, w[j], acc[r][j][0]);
      }
      k += 8;
    }
    if (F != Fmt::I4 && k < k1 && kg >= 8) {
      // The group's last 1..7 inputs: one 8-wide step over its last 8 inputs, the activations of the
      // ones already summed zeroed (every read stays inside the group).
      const int64_t rem = k1 - k;
      const __m256 keep = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(7 - rem))));
      __m256 w[NR];
      for (int j = 0; j < NR; ++j) w[j] = load8<F>(rows[j], k1 - 8).v;
      for (int r = 0; r < MR; ++r) {
        const __m256 x0 = _mm256_and_ps(_mm256_loadu_ps(x + r * ldx + k1 - 8), keep);
        for (int j = 0; j < NR; ++j) acc[r][j][0] = _mm256_fmadd_ps(x0, w[j], acc[r][j][0]);
      }
      k = k1;
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 sv = _mm256_set1_ps(s[j]);
      for (int r = 0; r < MR; ++r) tot[r][j] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[r][j][0], acc[r][j][1]), tot[r][j]);
    }
#endif
    // Explicit fused multiply-adds: the compiler may not contract or vectorise these differently per block shape.
    float tail[MR][NR] = {};
    for (; k < k1; ++k)
      for (int j = 0; j < NR; ++j) {
        const float wv = weight_at(W, n + j, k);
        for (int r = 0; r < MR; ++r) tail[r][j] = std::fma(x[r * ldx + k], wv, tail[r][j]);
      }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) tail_tot[r][j] = std::fma(s[j], tail[r][j], tail_tot[r][j]);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j)
#ifdef GROK1_AVX2
      y[r * ldy + n + j] = grok1::hsum(tot[r][j]) + tail_tot[r][j];
#else
      y[r * ldy + n + j] = tail_tot[r][j];
#endif
}

// Rows m of x against weight rows n0..n1, in blocks of MR x NR.
template <int MR, int NR, Fmt F>
inline void dots_rows(const float* x, const Weights& W, float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) dots<MR, NR, F>(x, W.K, W, n, y, W.N);
  for (; n < n1; ++n) dots<MR, 1, F>(x, W.K, W, n, y, W.N);
}

template <Fmt F>
void gemv_rows(const float* x, int64_t M, const Weights& W, float* y, int64_t n0, int64_t n1) {
  const int64_t K = W.K, N = W.N;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dots_rows<4, 2, F>(x + m * K, W, y + m * N, n0, n1);
  switch (M - m) {
    case 3: dots_rows<3, 2, F>(x + m * K, W, y + m * N, n0, n1); break;
    case 2: dots_rows<2, 2, F>(x + m * K, W, y + m * N, n0, n1); break;
    case 1: dots_rows<1, 4, F>(x + m * K, W, y + m * N, n0, n1); break;
    default: break;
  }
}

#ifndef CHUNK_KB
#define CHUNK_KB 512
#endif

// Small M: stream the weights once, in dynamic chunks (up to CHUNK_KB) so that on a shared machine a
// descheduled thread's work is taken over instead of stalling the call at the barrier.
void gemv(const float* x, int64_t M, const Weights& W, float* y) {
  if (W.fmt == Fmt::PANELS) return panel_matmul(x, M, W.w, W.panel_type, W.sf, W.N, W.K, W.G, W.P, y);
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
      case Fmt::PANELS: break;  // handled above
    }
  }
}

// One weight row, scaled, into K floats (for the BLAS path).
template <Fmt F>
void dequant_row(const Weights& W, int64_t n, float* dst) {
  const auto* row = static_cast<const uint8_t*>(W.w) + n * W.row_bytes;
  const int64_t kg = W.K / W.G;
  for (int64_t g = 0; g < W.G; ++g) {
    const float s = scale_of(W, n, g);
    const V8 sv = v_set1(s);
    int64_t k = g * kg;
    const int64_t end = k + kg;
    for (; k + 8 <= end && (F != Fmt::I4 || k % 8 == 0); k += 8) v_store(dst + k, v_fma(sv, load8<F>(row, k), v_zero()));
    for (; k < end; ++k) dst[k] = weight_at<F>(row, k) * s;
  }
}

// Large M: dequantise a tile of weight rows (exact float32 products), multiply with BLAS.
void tiled_gemm(const torch::Tensor& x, const Weights& W, torch::Tensor& y) {
  if (W.fmt == Fmt::PANELS)  // the panel kernel is compute-bound at any M: no BLAS
    return panel_matmul(x.data_ptr<float>(), x.size(0), W.w, W.panel_type, W.sf, W.N, W.K, W.G, W.P, y.data_ptr<float>());
  const int64_t K = W.K, N = W.N;
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
        for (int64_t r = 0; r < rows; ++r) switch (W.fmt) {
            case Fmt::I8: dequant_row<Fmt::I8>(W, n0 + r, wp + r * K); break;
            case Fmt::I4: dequant_row<Fmt::I4>(W, n0 + r, wp + r * K); break;
            case Fmt::BF16: dequant_row<Fmt::BF16>(W, n0 + r, wp + r * K); break;
            case Fmt::F32: dequant_row<Fmt::F32>(W, n0 + r, wp + r * K); break;
            case Fmt::PANELS: break;  // handled above
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

// The kernel's view of a stored weight w (contiguous) with its scales (contiguous), for inputs of size K;
// 3-D w is panels, with N outputs (n_panels: N, else unused).
Weights weights_of(const torch::Tensor& w, const torch::Tensor& scales, int64_t K, int64_t n_panels = -1) {
  if (w.dim() == 3) {
    TORCH_CHECK(w.size(1) == K && w.size(2) == 16, "panels: w must be [P, K, 16] with K = x.size(1)");
    const int64_t P = w.size(0), N = n_panels;
    TORCH_CHECK(N > 16 * (P - 1) && N <= 16 * P, "panels: ", N, " outputs do not fill ", P, " panels");
    Weights W{Fmt::PANELS, w.data_ptr(), 0, nullptr, N, K, 1, w.numel() * w.element_size()};
    W.P = P;
    if (w.scalar_type() == at::kChar) {
      TORCH_CHECK(scales.dim() == 2 && scales.size(1) == 16 * P && scales.scalar_type() == at::kFloat &&
                  K % scales.size(0) == 0, "int8 panels: scales float32 [G, 16 P]");
      W.panel_type = at::kChar, W.G = scales.size(0), W.sf = scales.data_ptr<float>();
    } else {
      TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
                  "panels: w must be int8, bfloat16 or float32");
      W.panel_type = w.scalar_type();
    }
    return W;
  }
  TORCH_CHECK(w.dim() == 2, "weights must be 2-D [N, K]");
  const int64_t N = w.size(0);
  Weights W{Fmt::F32, w.data_ptr(), 0, nullptr, N, K, 1, w.numel() * w.element_size()};
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
  if (W.fmt == Fmt::I8 || W.fmt == Fmt::I4) {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "linear: scales must be bfloat16");
    W.s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  }
  return W;
}

// h[i] = gelu_tanh(h[i]) * u[i], with gelu_tanh(v) = v * sigmoid(2 z), z = sqrt(2 / pi) (v + 0.044715 v^3)
// (the same function as 0.5 v (1 + tanh(z))).
void gelu_mul(float* h, const float* u, int64_t n) {
  int64_t i = 0;
#ifdef GROK1_AVX2
  const __m256 c1 = _mm256_set1_ps(-2.f * 0.7978845608028654f), c3 = _mm256_set1_ps(-2.f * 0.7978845608028654f * 0.044715f);
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(h + i);
    const __m256 e = grok1::exp8(_mm256_mul_ps(v, _mm256_fmadd_ps(_mm256_mul_ps(v, v), c3, c1)));  // exp(-2 z)
    const __m256 g = _mm256_div_ps(v, _mm256_add_ps(one, e));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(g, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float v = h[i];
    const float z = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    h[i] = v / (1.f + std::exp(std::min(87.f, std::max(-87.f, -2.f * z)))) * u[i];
  }
}

// gelu_mul row by row: each row's elements split into vector and scalar steps the same way, whatever the rows.
void gelu_rows(float* h, const float* u, int64_t rows, int64_t F) {
  for (int64_t r = 0; r < rows; ++r) gelu_mul(h + r * F, u + r * F, F);
}

}  // namespace

// y = x @ W.T for x float32 [M, K]; w and scales as described at the top (scales unused for bf16/fp32).
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t gemm_min_rows) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat, "linear: x float32 [M, K], w 2-D");
  x = x.contiguous();
  w = w.contiguous();
  scales = scales.contiguous();
  const Weights W = weights_of(w, scales, x.size(1));
  torch::Tensor y = torch::empty({x.size(0), W.N}, x.options());
  if (x.size(0) == 0) return y;
  if (x.size(0) >= gemm_min_rows) tiled_gemm(x, W, y);
  else gemv(x.data_ptr<float>(), x.size(0), W, y.data_ptr<float>());
  return y;
}

// y = x @ W.T for x float32 [M, K] and panel-packed W [P, K, 16] with N outputs (see panels.cpp).
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.dim() == 3, "panel_linear: x float32 [M, K], w [P, K, 16]");
  x = x.contiguous(), w = w.contiguous(), scales = scales.contiguous();
  const Weights W = weights_of(w, scales, x.size(1), N);
  torch::Tensor y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0)) gemv(x.data_ptr<float>(), x.size(0), W, y.data_ptr<float>());
  return y;
}

// The experts of one MoE layer for tokens x [N, D]: token t goes to experts idx[t, :] [N, A] with weights
// gate[t, :]. y[t] = sum over a, in slot order, of gate[t, a] * expert_{idx[t, a]}(x[t]), where
// expert_e(v) = (gelu_tanh(v W1e^T) * (v W3e^T)) W2e^T. Each chosen expert runs once on all its rows
// (weights read once); decode and batched calls share this code, and the matmuls give every row the
// same result whatever else is in the call, so batching does not change any token's output.
torch::Tensor experts(torch::Tensor x, torch::Tensor idx, torch::Tensor gate, torch::Tensor w1, torch::Tensor s1,
                      torch::Tensor w3, torch::Tensor s3, torch::Tensor w2, torch::Tensor s2, int64_t gemm_min_rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "experts: x float32 [N, D]");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.scalar_type() == at::kLong, "experts: idx int64 [N, A]");
  TORCH_CHECK(gate.sizes() == idx.sizes() && gate.scalar_type() == at::kFloat, "experts: gate float32 [N, A]");
  TORCH_CHECK(w1.dim() == w2.dim() && w1.dim() == w3.dim() && (w1.dim() == 3 || w1.dim() == 4) &&
              w1.size(0) == w2.size(0) && w1.size(0) == w3.size(0), "experts: w1, w3, w2 [E, ., .] (panels [E, ., ., 16])");
  x = x.contiguous(), idx = idx.contiguous(), gate = gate.contiguous();
  w1 = w1.contiguous(), w3 = w3.contiguous(), w2 = w2.contiguous();
  s1 = s1.contiguous(), s3 = s3.contiguous(), s2 = s2.contiguous();
  const int64_t N = x.size(0), D = x.size(1), A = idx.size(1), E = w1.size(0), R = N * A;
  const int64_t* ip = idx.data_ptr<int64_t>();
  // Bucket the (token, slot) pairs by expert, keeping token order within an expert.
  std::vector<int64_t> start(E + 1, 0), pos_of_pair(R), token_of_row(R);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < E, "experts: expert index out of range");
    ++start[ip[r] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = fill[ip[r]]++;
    pos_of_pair[r] = row;
    token_of_row[row] = r / A;
  }
  // Expert e's weights: expert 0's view, moved along by e experts (all stacks are contiguous).
  auto pick = [](const torch::Tensor& s, int64_t e) { return s.numel() ? s.select(0, e) : s; };
  // Panels ([E, P, K, 16]) do not record their outputs: F is w2's inputs, D is x's width.
  const bool panels = w1.dim() == 4;
  const int64_t F_in = panels ? w2.size(2) : -1;
  const Weights W1 = weights_of(w1.select(0, 0), pick(s1, 0), D, F_in);
  const Weights W3 = weights_of(w3.select(0, 0), pick(s3, 0), D, F_in);
  const Weights W2 = weights_of(w2.select(0, 0), pick(s2, 0), W1.N, D);
  auto expert = [E](Weights W, const torch::Tensor& s, int64_t e) {
    W.w = static_cast<const uint8_t*>(W.w) + e * W.bytes;
    if (W.s) W.s += e * (s.numel() / E);
    if (W.sf) W.sf += e * (s.numel() / E);
    return W;
  };
  const int64_t F = W1.N;
  TORCH_CHECK(W3.N == F && W2.N == D, "experts: w1, w3 [E, F, D] and w2 [E, D, F]");
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs(R * D), h(R * F), u(R * F), ys(R * D);
  for (int64_t r = 0; r < R; ++r) std::memcpy(&xs[r * D], xp + token_of_row[r] * D, D * sizeof(float));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e], r0 = start[e];
    if (n == 0) continue;
    const Weights w1e = expert(W1, s1, e), w3e = expert(W3, s3, e), w2e = expert(W2, s2, e);
    if (panels) {  // the first tiles of the next chosen expert's matrices on their way while this one computes
      int64_t e2 = e + 1;
      while (e2 < E && start[e2 + 1] == start[e2]) ++e2;
      if (e2 < E)
        for (const Weights& W : {expert(W1, s1, e2), expert(W3, s3, e2), expert(W2, s2, e2)}) {
          const int64_t panel_bytes = W.K * 16 * static_cast<int64_t>(c10::elementSize(W.panel_type)),
                        ahead = std::min<int64_t>(panel_bytes, 1024);
          for (int64_t p = 0; p < std::min<int64_t>(W.P, 4); ++p)
            for (int64_t b = 0; b < ahead; b += 64)
              grok1::prefetch_stream(static_cast<const char*>(W.w) + p * panel_bytes + b);
        }
    }
    if (n >= gemm_min_rows) {  // prefill-sized: the BLAS path, on tensor views of the buffers
      auto view = [](std::vector<float>& v, int64_t row, int64_t rows, int64_t cols) {
        return torch::from_blob(v.data() + row * cols, {rows, cols}, torch::kFloat);
      };
      torch::Tensor xe = view(xs, r0, n, D), he = view(h, r0, n, F), ue = view(u, r0, n, F), ye = view(ys, r0, n, D);
      tiled_gemm(xe, w1e, he);
      tiled_gemm(xe, w3e, ue);
      gelu_rows(&h[r0 * F], &u[r0 * F], n, F);
      tiled_gemm(he, w2e, ye);
    } else {
      gemv(&xs[r0 * D], n, w1e, &h[r0 * F]);
      gemv(&xs[r0 * D], n, w3e, &u[r0 * F]);
      gelu_rows(&h[r0 * F], &u[r0 * F], n, F);
      gemv(&h[r0 * F], n, w2e, &ys[r0 * D]);
    }
  }
  // y[t] = ((0 + g0 * y0) + g1 * y1) + ...: in slot order, whatever the batch.
  torch::Tensor y = torch::zeros({N, D}, x.options());
  float* yp = y.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  for (int64_t t = 0; t < N; ++t)
    for (int64_t a = 0; a < A; ++a) {
      const float g = gp[t * A + a];
      const float* src = &ys[pos_of_pair[t * A + a] * D];
      float* dst = yp + t * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += g * src[d];
    }
  return y;
}

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor pos,
                               torch::Tensor rows, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor valid,
                               int64_t kv_len, double scale, double cap);  // attention.cpp
torch::Tensor argmax_rows(torch::Tensor x);  // argmax.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);  // norm.cpp
torch::Tensor pack_panels(torch::Tensor src, torch::Tensor dst);  // panels.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernels run: a server's event loop keeps going meanwhile.
  m.def("linear", &linear, "y = x @ W.T with W int8 (+scales), packed int4 (+scales), bf16 or fp32",
        py::call_guard<py::gil_scoped_release>());
  m.def("panel_linear", &panel_linear, "y = x @ W.T with W packed in panels [P, K, 16], int8 (+float32 scales), bf16 or fp32",
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_panels", &pack_panels, "dst [P, K, 16] <- rows [R, K] in panels (panels.to_panels)",
        py::call_guard<py::gil_scoped_release>());
  m.def("experts", &experts, "the experts of one MoE layer: y[t] = sum_a gate[t, a] * expert_idx[t, a](x[t])",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, "RoPE, cache write and attention for one-token queries over the KV cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("argmax", &argmax_rows, "row-wise argmax of float32 [B, V], torch.argmax's answer",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "y = x * rsqrt(mean(x^2) + eps) * w over the last axis, float32",
        py::call_guard<py::gil_scoped_release>());
}
