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
// query's result depends only on its own inputs and its cache row: the batch does not change it.

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

// s[j] = cap * tanh(s[j] * scale / cap) for j < n.
void softcap(float* s, int64_t n, float scale, float cap) {
  int64_t j = 0;
#ifdef GROK1_AVX2
  const __m256 vscale = _mm256_set1_ps(scale), vcap = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f), minus2 = _mm256_set1_ps(-2.f);
  for (; j + 8 <= n; j += 8) {
    const __m256 u = _mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), vscale), vcap);
    // tanh|u| = (1 - e) / (1 + e), e = exp(-2|u|); the sign of u put back
    const __m256 e = grok1::exp8(_mm256_mul_ps(minus2, _mm256_andnot_ps(sign, u)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    _mm256_storeu_ps(s + j, _mm256_mul_ps(vcap, _mm256_or_ps(t, _mm256_and_ps(sign, u))));
  }
#endif
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j] * scale / cap);
}

// out[0..hd) = sum_j p[j] * v_j / total over j < n, v_j = v + j * hd (32 outputs at a time in registers, even
// and odd keys in separate sums added at the end: two independent chains of fused multiply-adds).
void weighted_sum(const float* p, const float* v, int64_t n, int64_t hd, float total, float* out) {
  const float inv = 1.f / total;
  int64_t i = 0;
#ifdef GROK1_AVX2
  while (i + 8 <= hd) {
    const int64_t c = std::min<int64_t>(4, (hd - i) / 8);  // vectors in this chunk
    __m256 even[4], odd[4];
    for (int64_t l = 0; l < c; ++l) even[l] = odd[l] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const __m256 p0 = _mm256_set1_ps(p[j]), p1 = _mm256_set1_ps(p[j + 1]);
      for (int64_t l = 0; l < c; ++l) {
        even[l] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v + j * hd + i + 8 * l), even[l]);
        odd[l] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v + (j + 1) * hd + i + 8 * l), odd[l]);
      }
    }
    if (j < n) {
      const __m256 p0 = _mm256_set1_ps(p[j]);
      for (int64_t l = 0; l < c; ++l) even[l] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v + j * hd + i + 8 * l), even[l]);
    }
    for (int64_t l = 0; l < c; ++l)
      _mm256_storeu_ps(out + i + 8 * l, _mm256_mul_ps(_mm256_add_ps(even[l], odd[l]), _mm256_set1_ps(inv)));
    i += 8 * c;
  }
#endif
  for (; i < hd; ++i) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc = std::fma(p[j], v[j * hd + i], acc);
    out[i] = acc * inv;
  }
}

// p[j] = exp(s[j] - max) over the allowed keys (keep[j] = 1; 0 where keep[j] = 0); returns the sum.
// No allowed key: p = 1 everywhere.
float softmax_weights(float* s, const float* keep, int64_t n) {
  int64_t j = 0;
  float m = -INFINITY;
#ifdef GROK1_AVX2
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) {
    const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(keep + j), _mm256_setzero_ps(), _CMP_NEQ_OQ);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), on));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float x : lanes) m = std::max(m, x);
#endif
  for (; j < n; ++j)
    if (keep[j] != 0.f) m = std::max(m, s[j]);
  if (m == -INFINITY) {
    std::fill(s, s + n, 1.f);
    return static_cast<float>(n);
  }
  j = 0;
  float total = 0.f;
#ifdef GROK1_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(keep + j), _mm256_setzero_ps(), _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(grok1::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm)), on);  // masked: 0
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  total = grok1::hsum(vsum);
#endif
  for (; j < n; ++j) {
    s[j] = keep[j] != 0.f ? std::exp(s[j] - m) : 0.f;
    total += s[j];
  }
  return total;
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
  // 2. Each (query, head) against its cache row.
  torch::Tensor out = torch::empty({N, H * Hd}, qkv.options());
  float* op = out.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1 && N * H * kv_len * Hd > (1 << 16))
  {
    std::vector<float> s(kv_len), keep(kv_len);
    int64_t mask_of = -1, n_keys = 0;  // the query whose mask `keep` holds (each thread's are consecutive)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * H; ++i) {
      const int64_t n = i / H, h = i % H, row = rp[n];
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
        mask_of = n;
      }
      const float* k = cache_at(kc, row, h / G, 0);
      const float* qh = &q[i * Hd];
      scores(qh, k, n_keys, Hd, s.data());
      softcap(s.data(), n_keys, static_cast<float>(scale), static_cast<float>(cap));
      const float total = softmax_weights(s.data(), keep.data(), n_keys);
      weighted_sum(s.data(), cache_at(vc, row, h / G, 0), n_keys, Hd, total, op + i * Hd);
    }
  }
  return out;
}
