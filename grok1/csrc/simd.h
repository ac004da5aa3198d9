// Vector helpers shared by the kernels (linear.cpp, panels.cpp, attention.cpp, argmax.cpp, norm.cpp): a
// horizontal sum, an 8-lane float32 exp, and Vec, the widest float32 vector this build has.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define GROK1_AVX512 1  // 16-lane versions of some AVX2 loops, with the same results
#endif

namespace grok1 {

// The sum of the 8 lanes: (lanes 0-3 + lanes 4-7), then pairwise.
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) for 8 lanes, x clamped to [-87, 87]: a Cephes-style exp (range reduction by ln 2, degree-6
// polynomial), within a few float32 ulps.
inline __m256 exp8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), ln2_hi = _mm256_set1_ps(0.693359375f),
               ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, ln2_hi, x);
  r = _mm256_fnmadd_ps(fx, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
  const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e2));
}

}  // namespace grok1
#endif

namespace grok1 {

// Software prefetch of a weight stream (read once per step, in order). Which hint serves best is the CPU's
// business, measured with the decode kernel on [131072, 1024] int8 panels (bench/README.md): on an Intel Xeon
// (Sapphire Rapids class) prefetchnta's lines bypass the L2 and the kernel read 6.3 GB/s per core, against
// 14.6 GB/s with prefetcht0 (11.5 GB/s for a plain streaming sum); on AMD Zen 3, where the kernels were first
// tuned, prefetchnta gave the figures then measured. So: NTA on AMD, T0 elsewhere.
#if defined(__x86_64__) || defined(__i386__)
inline bool prefer_nta() {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
}
inline const bool kPrefetchNTA = prefer_nta();
#else
inline const bool kPrefetchNTA = false;
#endif

inline void prefetch_stream(const void* p) {
  if (kPrefetchNTA) __builtin_prefetch(p, 0, 0);
  else __builtin_prefetch(p, 0, 3);
}

// A bf16 value (its bits) as the float32 it stands for: the top half of a float32, exactly.
inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace grok1

namespace grok1::vec {

// L float32 lanes: one AVX-512 register (16), one AVX2 register (8), or a plain float (scalar builds). Code
// written lane-wise with these (no horizontal sums) gives the same bits in every build.
#if defined(GROK1_AVX512)
constexpr int L = 16;
struct Vec { __m512 v; };
inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec set1(float s) { return {_mm512_set1_ps(s)}; }
inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec load(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec load(const uint16_t* p) {  // bf16: the top half of a float32, exactly
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline void store(float* p, Vec a, int n) {
  if (n == L) _mm512_storeu_ps(p, a.v);
  else _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v);
}
#elif defined(GROK1_AVX2)
constexpr int L = 8;
struct Vec { __m256 v; };
inline Vec zero() { return {_mm256_setzero_ps()}; }
inline Vec set1(float s) { return {_mm256_set1_ps(s)}; }
inline Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec load(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec load(const uint16_t* p) {  // bf16: the top half of a float32, exactly
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))};
}
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline void store(float* p, Vec a, int n) {
  if (n == L) { _mm256_storeu_ps(p, a.v); return; }
  alignas(32) float tmp[L];
  _mm256_store_ps(tmp, a.v);
  std::memcpy(p, tmp, n * sizeof(float));
}
#else
constexpr int L = 1;
struct Vec { float v; };
inline Vec zero() { return {0.f}; }
inline Vec set1(float s) { return {s}; }
inline Vec load(const float* p) { return {*p}; }
inline Vec load(const int8_t* p) { return {static_cast<float>(*p)}; }
inline Vec load(const uint16_t* p) { return {bf16_to_float(*p)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return {std::fma(a.v, b.v, c.v)}; }
inline Vec mul(Vec a, Vec b) { return {a.v * b.v}; }
inline void store(float* p, Vec a, int n) { if (n) *p = a.v; }
#endif

}  // namespace grok1::vec
