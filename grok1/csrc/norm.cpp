// RMSNorm of float32 rows (see grok1/kernels.py, CompiledRMSNorm): y = x * rsqrt(mean(x^2) + eps) * w.
// torch has no fused CPU kernel for it (F.rms_norm runs five elementwise and reduction ops, ~12 us per
// call on a decode row); this is one pass to sum the squares and one to scale. Each row's result depends
// only on that row.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "simd.h"

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 1 && x.dim() >= 1 &&
              x.size(-1) == w.size(0), "rms_norm: x float32 [..., D], w float32 [D]");
  x = x.contiguous(), w = w.contiguous();
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  torch::Tensor y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      int64_t i = 0;
      float ss = 0.f;
#ifdef GROK1_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= D; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      ss = grok1::hsum(acc);
#endif
      for (; i < D; ++i) ss = std::fma(xr[i], xr[i], ss);
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      i = 0;
#ifdef GROK1_AVX2
      const __m256 s = _mm256_set1_ps(scale);
      for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s), _mm256_loadu_ps(wp + i)));
#endif
      for (; i < D; ++i) yr[i] = xr[i] * scale * wp[i];
    }
  });
  return y;
}
