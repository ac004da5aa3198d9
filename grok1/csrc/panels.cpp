// Matmul over weights packed in panels (see grok1/kernels.py, pack_panels): the layout of a GEMM's
// packed B operand, kept as the weights' storage for inference.
//
// W [N, K] becomes P [ceil(N / 16), K, 16]: panel p holds output columns 16p..16p+15, input k's 16
// weights side by side (columns past N are zero). The weights are float32, bf16 or int8; int8 panels come
// with float32 scales S [G, 16 * P] (group g covers inputs g K/G .. (g + 1) K/G - 1), the release's
// bf16 scales widened.
//
// y[m, n] = sum over g of S[g, n] * (x[m, k0] W[n, k0] + x[m, k0 + 1] W[n, k0 + 1] + ...): one fused
// multiply-add per input, in input order, in one vector lane, and the groups in order. No horizontal
// sums: a tile is MR activation rows x NU vectors of output columns, each input's weight vectors loaded
// (and converted) once for the MR rows, each activation broadcast once for the NU vectors. The arithmetic
// of each output is the same whatever the tile shape, the vector width (AVX-512, AVX2, scalar) or the
// number of rows and threads: a row's result never depends on what else shares the call.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace {

constexpr int PANEL = 16;

using namespace grok1::vec;

constexpr int UNITS_PER_PANEL = PANEL / L;
// Panels between a unit's panel and the same unit's in the next tile of NU units (whole panels only).
template <int NU> constexpr int64_t NU_STRIDE = UNITS_PER_PANEL == 1 ? NU : 1;
template <typename T> constexpr int64_t K_PER_LINE = 64 / (PANEL * sizeof(T));  // inputs per 64-byte line of a panel

struct Panels {
  const void* w;  // [P, K, 16] float32, bf16 (as uint16) or int8
  const float* s;  // int8: [G, 16 P]; else nullptr
  int64_t N, K, G, P;
};

// Rows x[0..MR) (row stride K) against output columns u L .. (u + NU) L (vector units u..u+NU).
template <int MR, int NU, typename T>
inline void tile(const float* x, const Panels& W, int64_t u, float* y, int64_t ldy) {
  const T* base = static_cast<const T*>(W.w);
  const T* col[NU];  // unit j's weights at input 0; input k is PANEL k further
  for (int j = 0; j < NU; ++j) {
    const int64_t uu = u + j;
    col[j] = base + (uu / UNITS_PER_PANEL) * W.K * PANEL + (uu % UNITS_PER_PANEL) * L;
  }
  const int64_t kg = W.K / W.G;
  Vec tot[MR][NU], acc[MR][NU];
  for (int64_t g = 0; g < W.G; ++g) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NU; ++j) acc[r][j] = zero();
    for (int64_t k = g * kg; k < (g + 1) * kg; ++k) {
      // Each panel is a stream: ask for its weights 64 inputs ahead (the hint is the CPU's: simd.h).
      if (k % K_PER_LINE<T> == 0) {
        // near the panel's end: the start of the panel this unit's column of tiles reads next
        const int64_t ahead = k + 64;
        const int64_t next = ahead < W.K ? ahead * PANEL : (ahead - W.K + NU_STRIDE<NU> * W.K) * PANEL;
        for (int j = 0; j < NU; ++j) grok1::prefetch_stream(col[j] + next);
      }
      Vec w[NU];
      for (int j = 0; j < NU; ++j) w[j] = load(col[j] + k * PANEL);
      for (int r = 0; r < MR; ++r) {
        const Vec xv = set1(x[r * W.K + k]);
        for (int j = 0; j < NU; ++j) acc[r][j] = fma(xv, w[j], acc[r][j]);
      }
    }
    if constexpr (std::is_same_v<T, int8_t>) {
      for (int j = 0; j < NU; ++j) {
        const Vec s = load(W.s + g * W.P * PANEL + (u + j) * L);
        for (int r = 0; r < MR; ++r) tot[r][j] = fma(s, acc[r][j], g ? tot[r][j] : zero());
      }
    } else {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NU; ++j) tot[r][j] = acc[r][j];
    }
  }
  for (int j = 0; j < NU; ++j) {
    const int64_t n = (u + j) * L;
    const int cols = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(L, W.N - n)));
    for (int r = 0; r < MR; ++r) store(y + r * ldy + n, tot[r][j], cols);
  }
}

// Tile shapes: accumulators fill about three quarters of the vector registers (32 with AVX-512, 16 with
// AVX2); a single row gets more column vectors, so that enough independent sums are in flight.
#if defined(GROK1_AVX512)
constexpr int MR_MAX = 8;
template <int MR> constexpr int nu_for() { return MR == 1 ? 8 : MR <= 6 ? 4 : 3; }
#elif defined(GROK1_AVX2)
constexpr int MR_MAX = 4;
template <int MR> constexpr int nu_for() { return MR == 1 ? 6 : 3; }
#else
constexpr int MR_MAX = 4;
template <int MR> constexpr int nu_for() { return 4; }
#endif

// The tile width (vector units) of a block of M < MR_MAX rows.
inline int64_t tile_units(int64_t M) {
  switch (M) {
#if defined(GROK1_AVX512)
    case 7: return nu_for<7>();
    case 6: return nu_for<6>();
    case 5: return nu_for<5>();
    case 4: return nu_for<4>();
#endif
    case 3: return nu_for<3>();
    case 2: return nu_for<2>();
    default: return nu_for<1>();
  }
}

// Rows m0..m0+MR of x against the column units [u0, u1), NU at a time.
template <int MR, typename T>
inline void tile_row(const float* x, const Panels& W, int64_t u0, int64_t u1, float* y) {
  constexpr int NU = nu_for<MR>();
  int64_t u = u0;
  for (; u + NU <= u1; u += NU) tile<MR, NU, T>(x, W, u, y, W.N);
  for (; u < u1; ++u) tile<MR, 1, T>(x, W, u, y, W.N);
}

// All M rows against column units [u0, u1): the weights of a few panels stay in cache while every block
// of rows goes past them.
template <typename T>
void rows_against(const float* x, int64_t M, const Panels& W, int64_t u0, int64_t u1, float* y) {
  int64_t m = 0;
  for (; m + MR_MAX <= M; m += MR_MAX) tile_row<MR_MAX, T>(x + m * W.K, W, u0, u1, y + m * W.N);
  const float* xm = x + m * W.K;
  float* ym = y + m * W.N;
  switch (M - m) {
#if defined(GROK1_AVX512)
    case 7: tile_row<7, T>(xm, W, u0, u1, ym); break;
    case 6: tile_row<6, T>(xm, W, u0, u1, ym); break;
    case 5: tile_row<5, T>(xm, W, u0, u1, ym); break;
    case 4: tile_row<4, T>(xm, W, u0, u1, ym); break;
#endif
    case 3: tile_row<3, T>(xm, W, u0, u1, ym); break;
    case 2: tile_row<2, T>(xm, W, u0, u1, ym); break;
    case 1: tile_row<1, T>(xm, W, u0, u1, ym); break;
    default: break;
  }
}

}  // namespace

// y [M, N] = x [M, K] @ W.T for panel-packed W; threads split the columns.
void panel_matmul(const float* x, int64_t M, const void* w, at::ScalarType type, const float* s, int64_t N, int64_t K,
                  int64_t G, int64_t P, float* y) {
  const Panels W{w, s, N, K, G, P};
  const int64_t units = (N + L - 1) / L;
  // Chunks of columns whose weights stay in the core's cache (~256 KB) while all the rows go past them, at
  // least 4 per thread when there is work for several, in whole tiles of the widest row block (few rows:
  // tiles of nu_for<M> units, so a narrow matrix such as a 1024-output w2 still splits evenly between
  // threads; more rows: multiples of 24 units, whole tiles for every MR).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t unit_bytes = K * L * static_cast<int64_t>(c10::elementSize(type));
  const int64_t by_cache = (256 * 1024) / std::max<int64_t>(unit_bytes, 1);
  const int64_t whole = M >= MR_MAX ? 24 : tile_units(M);
  const int64_t chunk = std::max<int64_t>(whole, std::min(by_cache, (units + 4 * threads - 1) / (4 * threads)) / whole * whole);
  const int64_t n_chunks = (units + chunk - 1) / chunk;
  const bool parallel = threads > 1 && M * N * K >= (1 << 18);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t u0 = c * chunk, u1 = std::min(units, u0 + chunk);
    if (type == at::kChar) rows_against<int8_t>(x, M, W, u0, u1, y);
    else if (type == at::kBFloat16) rows_against<uint16_t>(x, M, W, u0, u1, y);
    else rows_against<float>(x, M, W, u0, u1, y);
  }
}

// dst [P, K, 16] (a slice of panels) <- src rows [R, K], R <= 16 P (contiguous, same element type, int8,
// bf16 or float32): dst[p, k, j] = src[16 p + j, k], zero where 16 p + j >= R. Each panel reads its 16 rows side by
// side (16 sequential streams) and writes sequentially; threads split the panels.
template <typename T>
void pack_rows(const T* s, T* d, int64_t R, int64_t K, int64_t P) {
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* rows[16];
      int live = 0;
      for (int j = 0; j < 16; ++j)
        if (16 * p + j < R) rows[live++] = s + (16 * p + j) * K;
      T* out = d + p * K * 16;
      for (int64_t k = 0; k < K; ++k, out += 16) {
        for (int j = 0; j < live; ++j) out[j] = rows[j][k];
        for (int j = live; j < 16; ++j) out[j] = T(0);
      }
    }
  });
}

torch::Tensor pack_panels(torch::Tensor src, torch::Tensor dst) {
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 3 && dst.size(2) == 16 && src.size(1) == dst.size(1) &&
              src.size(0) <= 16 * dst.size(0) && src.scalar_type() == dst.scalar_type() && src.is_contiguous() &&
              dst.is_contiguous() && (src.scalar_type() == at::kChar || src.scalar_type() == at::kFloat ||
                                      src.scalar_type() == at::kBFloat16),
              "pack_panels: src [R, K], dst [P, K, 16] with R <= 16 P, both contiguous int8, bf16 or float32");
  const int64_t R = src.size(0), K = src.size(1), P = dst.size(0);
  if (src.scalar_type() == at::kChar) pack_rows(src.data_ptr<int8_t>(), dst.data_ptr<int8_t>(), R, K, P);
  else if (src.scalar_type() == at::kBFloat16)
    pack_rows(static_cast<const uint16_t*>(src.data_ptr()), static_cast<uint16_t*>(dst.data_ptr()), R, K, P);
  else pack_rows(src.data_ptr<float>(), dst.data_ptr<float>(), R, K, P);
  return dst;
}
