// Attention for queries of one token each (decode rows, and prompt tokens riding along with them), over
// the KV cache read in place (see grok1/kernels.py, CompiledAttention).
//
// Query n is the token at position pos[n] of cache row rows[n]. Its fused projection qkv[n] holds H query
// heads, then K key heads, then K value heads, Hd values each (before RoPE). For every query:
//   1. RoPE (rotate-half) on its query and key heads, the products and the sum rounded separately exactly
//      as model.apply_rope does in float32; its key and value are written to the cache at (rows[n], pos[n]).
//   2. Query head h (KV head h / G, G = H / K) attends to keys 0..kv_len-1 of its cache row:
//      s = cap * tanh((q . k) * scale / cap), keys masked unless j <= pos[n] and valid[row, j], softmax,
//      the probability-weighted sum of the values. If every key is masked the softmax is uniform over all
//      kv_len keys (what replacing masked scores by -1e30 gives, as the reference does).
// All writes happen before any read, so tokens of one row in one call see each other causally. Each
// query's result depends only on its own inputs and its cache row: the batch does not change it. The G query
// heads of a KV head are computed together, sharing its value loads; keys are scored in whole blocks of 8,
// those past the query's position masked, so a row's later positions (whatever they hold) never count.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "simd.h"

namespace {

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for halves x1, x2 (compiled without
// contraction: each product and the sum are rounded as in torch's three elementwise ops).
inline void rope_head(const float* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * cos[i], b = -x[i + half] * sin[i];
    out[i] = a + b;
  }
  for (int64_t i = half; i < hd; ++i) {
    const float a = x[i] * cos[i], b = x[i - half] * sin[i];
    out[i] = a + b;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float tail = 0.f;
#ifdef GROK1_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  tail = grok1::hsum(acc);
#endif
  for (; i < n; ++i) tail = std::fma(a[i], b[i], tail);
  return tail;
}

#ifdef GROK1_AVX2
// Lane l = the horizontal sum of a[l], for 8 vectors at once.
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// s[j] = q . k_j for j < n, k_j = k + j * hd: eight keys at a time, the rest one by one.
void scores(const float* q, const float* k, int64_t n, int64_t hd, float* s) {
  int64_t j = 0;
#ifdef GROK1_AVX2
  if (hd % 8 == 0)
    for (; j + 8 <= n; j += 8) {
      __m256 acc[8];
      for (int l = 0; l < 8; ++l) acc[l] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int l = 0; l < 8; ++l) acc[l] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (j + l) * hd + i), acc[l]);
      }
      _mm256_storeu_ps(s + j, hsum8(acc));
    }
#endif
  for (; j < n; ++j) s[j] = dot(q, k + j * hd, hd);
}

// Keys are scored in blocks of KB (8 in AVX2 builds, 1 in scalar ones): the score buffers are padded to a
// whole block and the keys past a query's own are masked, so no key takes a scalar path.
#ifdef GROK1_AVX2
constexpr int64_t KB = 8;
#else
constexpr int64_t KB = 1;
#endif
inline int64_t padded(int64_t n) { return (n + KB - 1) / KB * KB; }

// s[j] = cap * tanh(s[j] * (scale / cap)) for j < n (a whole number of blocks).
void softcap(float* s, int64_t n, float scale, float cap) {
  const float k = scale / cap;
  int64_t j = 0;
#ifdef GROK1_AVX2
  const __m256 vk = _mm256_set1_ps(k), vcap = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f), minus2 = _mm256_set1_ps(-2.f);
  for (; j + 8 <= n; j += 8) {
    const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(s + j), vk);
    // tanh|u| = (1 - e) / (1 + e), e = exp(-2|u|); the sign of u put back
    const __m256 e = grok1::exp8(_mm256_mul_ps(minus2, _mm256_andnot_ps(sign, u)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    _mm256_storeu_ps(s + j, _mm256_mul_ps(vcap, _mm256_or_ps(t, _mm256_and_ps(sign, u))));
  }
#endif
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j] * k);
}

// p[j] = exp(s[j] - max) over the allowed keys (keep[j] = 1; 0 where keep[j] = 0) for j < m (a whole number of
// blocks); returns the sum. No allowed key: p = 1 for the first n keys, and the sum is n.
float softmax_weights(float* s, const float* keep, int64_t n, int64_t m) {
  int64_t j = 0;
  float mx = -INFINITY;
#ifdef GROK1_AVX2
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= m; j += 8) {
    const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(keep + j), _mm256_setzero_ps(), _CMP_NEQ_OQ);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), on));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float x : lanes) mx = std::max(mx, x);
#endif
  for (; j < m; ++j)
    if (keep[j] != 0.f) mx = std::max(mx, s[j]);
  if (mx == -INFINITY) {
    std::fill(s, s + n, 1.f);
    return static_cast<float>(n);
  }
  j = 0;
  float total = 0.f;
#ifdef GROK1_AVX2
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (; j + 8 <= m; j += 8) {
    const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(keep + j), _mm256_setzero_ps(), _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(grok1::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm)), on);  // masked: 0
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  total = grok1::hsum(vsum);
#endif
  for (; j < m; ++j) {
    s[j] = keep[j] != 0.f ? std::exp(s[j] - mx) : 0.f;
    total += s[j];
  }
  return total;
}

using namespace grok1::vec;

// Heads HB x value vectors CV (of L lanes) from lane i: out_h[i..] = inv_h * sum over j < n of p_h[j] v_j[i..],
// p_h = p + h ld, out_h = out + h hd. Each value vector is loaded once for the HB heads.
template <int HB, int CV>
inline void wsum_tile(const float* p, int64_t ld, const float* inv, const float* v, int64_t n, int64_t hd, int64_t i,
                      float* out) {
  Vec acc[HB][CV];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < CV; ++c) acc[h][c] = zero();
  for (int64_t j = 0; j < n; ++j) {
    Vec x[CV];
    for (int c = 0; c < CV; ++c) x[c] = load(v + j * hd + i + c * L);
    for (int h = 0; h < HB; ++h) {
      const Vec w = set1(p[h * ld + j]);
      for (int c = 0; c < CV; ++c) acc[h][c] = fma(w, x[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < CV; ++c) store(out + h * hd + i + c * L, mul(acc[h][c], set1(inv[h])), L);
}

template <int CV>
inline void wsum_heads(int hb, const float* p, int64_t ld, const float* inv, const float* v, int64_t n, int64_t hd,
                       int64_t i, float* out) {
  switch (hb) {
    case 4: wsum_tile<4, CV>(p, ld, inv, v, n, hd, i, out); break;
    case 3: wsum_tile<3, CV>(p, ld, inv, v, n, hd, i, out); break;
    case 2: wsum_tile<2, CV>(p, ld, inv, v, n, hd, i, out); break;
    default: wsum_tile<1, CV>(p, ld, inv, v, n, hd, i, out); break;
  }
}

// The G query heads of one KV head: out_g[0..hd) = (sum over j < n of p_g[j] v_j) / total_g, v_j = v + j hd,
// p_g = p + g ld, out_g = out + g hd. Every output is one chain of fused multiply-adds in key order, then one
// multiply by 1 / total_g: the same operations whatever the build's vector width.
void weighted_sums(const float* p, int64_t ld, const float* total, int64_t G, const float* v, int64_t n, int64_t hd,
                   float* out) {
  constexpr int HB = L == 8 ? 2 : 4;  // heads per tile: HB x 4 accumulators fit the registers (16 with AVX2)
  float inv[HB];
  for (int64_t g0 = 0; g0 < G; g0 += HB) {
    const int hb = static_cast<int>(std::min<int64_t>(HB, G - g0));
    for (int h = 0; h < hb; ++h) inv[h] = 1.f / total[g0 + h];
    const float* pg = p + g0 * ld;
    float* og = out + g0 * hd;
    int64_t i = 0;
    for (; i + 4 * L <= hd; i += 4 * L) wsum_heads<4>(hb, pg, ld, inv, v, n, hd, i, og);
    if (i + 2 * L <= hd) wsum_heads<2>(hb, pg, ld, inv, v, n, hd, i, og), i += 2 * L;
    for (; i + L <= hd; i += L) wsum_heads<1>(hb, pg, ld, inv, v, n, hd, i, og);
    for (; i < hd; ++i)  // lanes past the last whole vector: the same chain, one lane at a time
      for (int h = 0; h < hb; ++h) {
        float acc = 0.f;
        for (int64_t j = 0; j < n; ++j) acc = std::fma(pg[h * ld + j], v[j * hd + i], acc);
        og[h * hd + i] = acc * inv[h];
      }
  }
}

}  // namespace

// qkv float32 [N, (H + 2K) * Hd]; cos, sin float32 [N, Hd]; pos, rows int64 [N]; k_cache, v_cache float32
// [B, K, S_max, Hd] (one layer, written at (rows[n], :, pos[n])); valid bool [B, S_max]. Returns [N, H * Hd].
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor pos,
                               torch::Tensor rows, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor valid,
                               int64_t kv_len, double scale, double cap) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention: k_cache, v_cache contiguous float32 [B, K, S_max, Hd]");
  const int64_t B = k_cache.size(0), K = k_cache.size(1), S_max = k_cache.size(2), Hd = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.size(1) % Hd == 0, "decode_attention: qkv float32 [N, (H + 2K) * Hd]");
  const int64_t N = qkv.size(0), H = qkv.size(1) / Hd - 2 * K;
  TORCH_CHECK(H > 0 && H % K == 0, "decode_attention: query heads must be a multiple of the cache's KV heads");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == N && cos.size(1) == Hd &&
              cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "decode_attention: cos, sin float32 [N, Hd]");
  TORCH_CHECK(pos.dim() == 1 && rows.dim() == 1 && pos.size(0) == N && rows.size(0) == N && pos.scalar_type() == at::kLong &&
              rows.scalar_type() == at::kLong, "decode_attention: pos, rows int64 [N]");
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == B && valid.size(1) == S_max && valid.scalar_type() == at::kBool,
              "decode_attention: valid bool [B, S_max]");
  TORCH_CHECK(kv_len >= 1 && kv_len <= S_max, "decode_attention: kv_len out of range");
  qkv = qkv.contiguous(), cos = cos.contiguous(), sin = sin.contiguous();
  pos = pos.contiguous(), rows = rows.contiguous(), valid = valid.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(rp[n] >= 0 && rp[n] < B && pp[n] >= 0 && pp[n] < kv_len, "decode_attention: row or position out of range");
  const int64_t G = H / K, width = qkv.size(1);
  const float *qp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const bool* vp = valid.data_ptr<bool>();
  auto cache_at = [=](float* base, int64_t row, int64_t head, int64_t p) { return base + ((row * K + head) * S_max + p) * Hd; };

  // 1. RoPE; keys and values into the cache.
  std::vector<float> q(N * H * Hd);
  for (int64_t n = 0; n < N; ++n) {
    const float* src = qp + n * width;
    for (int64_t h = 0; h < H; ++h) rope_head(src + h * Hd, cp + n * Hd, sp + n * Hd, &q[(n * H + h) * Hd], Hd);
    for (int64_t h = 0; h < K; ++h) {
      rope_head(src + (H + h) * Hd, cp + n * Hd, sp + n * Hd, cache_at(kc, rp[n], h, pp[n]), Hd);
      std::memcpy(cache_at(vc, rp[n], h, pp[n]), src + (H + K + h) * Hd, Hd * sizeof(float));
    }
  }
  // 2. Each (query, KV head) against its cache row: the KV head's G query heads share its key and value rows.
  torch::Tensor out = torch::empty({N, H * Hd}, qkv.options());
  float* op = out.data_ptr<float>();
  const int64_t threads = at::get_num_threads(), ld = padded(kv_len);
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(cap);
#pragma omp parallel num_threads(threads) if (threads > 1 && N * H * kv_len * Hd > (1 << 16))
  {
    std::vector<float> s(G * ld), keep(ld), total(G);
    int64_t mask_of = -1, n_keys = 0;  // the query whose mask `keep` holds (each thread's are consecutive)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * K; ++i) {
      const int64_t n = i / K, kh = i % K, row = rp[n];
      if (i + 1 < N * K) {  // the start of the next item's keys and values on its way while this one computes
        const int64_t n1 = (i + 1) / K, kh1 = (i + 1) % K;
        const char* k1 = reinterpret_cast<const char*>(cache_at(kc, rp[n1], kh1, 0));
        const char* v1 = reinterpret_cast<const char*>(cache_at(vc, rp[n1], kh1, 0));
        for (int64_t b = 0, bytes = std::min<int64_t>((pp[n1] + 1) * Hd * 4, 8192); b < bytes; b += 64) {
          __builtin_prefetch(k1 + b);
          __builtin_prefetch(v1 + b);
        }
      }
      if (n != mask_of) {
        // Keys after the query's own position are masked: leave them out (unless every key is masked), so
        // the result does not depend on kv_len, which the other queries in the call set.
        n_keys = pp[n] + 1;
        bool any = false;
        for (int64_t j = 0; j < n_keys; ++j) {
          keep[j] = vp[row * S_max + j] ? 1.f : 0.f;
          any = any || vp[row * S_max + j];
        }
        if (!any) {
          n_keys = kv_len;  // the degenerate case: a uniform average over all kv_len keys
          std::fill(keep.begin(), keep.begin() + n_keys, 0.f);
        }
        std::fill(keep.begin() + n_keys, keep.begin() + padded(n_keys), 0.f);
        mask_of = n;
      }
      // Scores for whole blocks of keys: those past n_keys (later positions of the row, whatever they hold)
      // are masked out of the softmax; past the end of the cache row there is nothing to read.
      const int64_t m = padded(n_keys), m_read = std::min(m, S_max);
      const float* k = cache_at(kc, row, kh, 0);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &s[g * ld];
        scores(&q[(n * H + kh * G + g) * Hd], k, m_read, Hd, sg);
        std::fill(sg + m_read, sg + m, 0.f);
        softcap(sg, m, fscale, fcap);
        total[g] = softmax_weights(sg, keep.data(), n_keys, m);
      }
      weighted_sums(s.data(), ld, total.data(), G, cache_at(vc, row, kh, 0), n_keys, Hd, op + (n * H + kh * G) * Hd);
    }
  }
  return out;
}
