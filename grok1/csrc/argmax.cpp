// Row-wise argmax of float32 logits [B, V] (see grok1/kernels.py): torch's CPU argmax is a scalar loop,
// ~1 ns per element; this one keeps 8 running maxima and their indices in vector registers.
// Same answer as torch.argmax: the lowest index among equal maxima, and the first NaN if there is one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "simd.h"

namespace {

int64_t argmax_row(const float* x, int64_t V) {
  float best = x[0];
  int64_t best_i = 0, i = 1;
#ifdef GROK1_AVX2
  if (V >= 16) {
    __m256 vmax = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(vmax, vmax, _CMP_UNORD_Q);
    __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vidx;
    const __m256i eight = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= V; i += 8) {
      cur = _mm256_add_epi32(cur, eight);
      const __m256 v = _mm256_loadu_ps(x + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);  // strictly greater: each lane keeps its first maximum
      vmax = _mm256_blendv_ps(vmax, v, gt);
      vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
    }
    if (_mm256_movemask_ps(nan)) {
      for (int64_t j = 0; j < V; ++j)
        if (std::isnan(x[j])) return j;
    }
    alignas(32) float m[8];
    alignas(32) int32_t idx[8];
    _mm256_store_ps(m, vmax);
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), vidx);
    best = m[0], best_i = idx[0];
    for (int l = 1; l < 8; ++l)
      if (m[l] > best || (m[l] == best && idx[l] < best_i)) best = m[l], best_i = idx[l];
  }
#endif
  for (; i < V; ++i) {  // later indices than every lane's: strictly greater keeps the first on ties
    if (std::isnan(x[i])) {
      for (int64_t j = 0; j <= i; ++j)
        if (std::isnan(x[j])) return j;
    }
    if (x[i] > best) best = x[i], best_i = i;
  }
  return std::isnan(best) ? 0 : best_i;
}

}  // namespace

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0 && x.size(1) < (int64_t{1} << 31),
              "argmax: x float32 [B, V], 0 < V < 2^31");
  x = x.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  torch::Tensor out = torch::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, (1 << 16) / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = argmax_row(xp + b * V, V);
  });
  return out;
}
