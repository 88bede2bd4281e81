// bf16 linear layers for the engine's decode steps on the CPU: y = x W^T with W prepacked once.
//
//   pack_linear(w [N, K] bf16, gated) -> packed [blocks, K/2, 32] bf16
//   linear_packed(x [M, K] bf16, packed, n_out, gated, fp32_out) -> y [M, n_out] bf16 (or fp32)
//
// Why: a decode step multiplies 1-128 rows by every weight of the model. At a few rows the step is
// bound by reading the weights once (the ~270 MB of SmolLM2-135M: ~9 ms at 31 GB/s), but a
// general GEMM that re-lays-out W on every call runs 3-5x slower than that. Packing W once into
// the order the inner loop reads it - blocks of 16 output columns, K in pairs, so one 64-byte
// load feeds one AVX512-BF16 dot-product instruction per row - makes the small-batch steps (a
// tree's first levels, the tail of a sampling run) close to memory speed.
//
// gated: w is cat([gate, up]) [2I, K]; gate and up column blocks are interleaved when packing and
// the epilogue writes silu(gate) * up [M, I] - the whole MLP input side in one pass.
// Accumulation is fp32 (as oneDNN's); the output is rounded once to bf16 (round to nearest even).
// Without AVX512-BF16 (another CPU, TREEPO_NATIVE=0) a portable loop computes the same thing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <cstdint>
#include <cstring>
#include <utility>

#include "bf16.h"
#include "ops.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TREEPO_AVX512BF16 1
#endif

namespace treepo {
namespace {

constexpr int kCols = 16;  // output columns per packed block

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// The packed block holding output column block `j` of the (gated) weight's blocks.
struct Layout {
  int64_t N, K, K2, blocks, n_out;
  bool gated;
};

Layout layout_for(int64_t N, int64_t K, bool gated) {
  TORCH_CHECK(K % 2 == 0, "linear_packed: K=", K, " must be even");
  Layout L{N, K, K / 2, 0, gated ? N / 2 : N, gated};
  TORCH_CHECK(!gated || N % 2 == 0, "linear_packed: a gated weight [2I, K] needs an even row count, got ", N);
  int64_t nb = (L.n_out + kCols - 1) / kCols;
  L.blocks = gated ? 2 * nb : nb;
  return L;
}

// ------------------------------------------------------------------ portable path
// y[m, block c] for all M rows and packed blocks [b0, b1)
void portable_range(const uint16_t* x, int64_t lda, const uint16_t* pk, const Layout& L, int64_t M, int64_t b0,
                    int64_t b1, void* y, bool fp32_out) {
  float acc[2][kCols];
  const int64_t step = L.gated ? 2 : 1;
  for (int64_t b = b0; b < b1; b += step) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t s = 0; s < step; ++s) {
        const uint16_t* B = pk + (b + s) * L.K2 * 2 * kCols;
        float* a = acc[s];
        std::fill(a, a + kCols, 0.0f);
        for (int64_t k = 0; k < L.K2; ++k) {
          const float x0 = bf16_to_float(x[m * lda + 2 * k]), x1 = bf16_to_float(x[m * lda + 2 * k + 1]);
          for (int c = 0; c < kCols; ++c)
            a[c] += x0 * bf16_to_float(B[(k * kCols + c) * 2]) + x1 * bf16_to_float(B[(k * kCols + c) * 2 + 1]);
        }
      }
      const int64_t col0 = (b / step) * kCols;
      const int64_t n = std::min<int64_t>(kCols, L.n_out - col0);
      for (int64_t c = 0; c < n; ++c) {
        const float v = L.gated ? silu(acc[0][c]) * acc[1][c] : acc[0][c];
        if (fp32_out)
          static_cast<float*>(y)[m * L.n_out + col0 + c] = v;
        else
          static_cast<uint16_t*>(y)[m * L.n_out + col0 + c] = float_to_bf16(v);
      }
    }
  }
}

#ifdef TREEPO_AVX512BF16
// ------------------------------------------------------------------ AVX512-BF16 path
inline __m512 exp512(__m512 x) {  // e^x, x clamped to [-87, 88], ~2 ulp
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

inline void store_row(__m512 v, void* y, int64_t offset, int64_t n, bool fp32_out) {
  const __mmask16 mask = n >= kCols ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  if (fp32_out) {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + offset, mask, v);
  } else {
    const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + offset, mask, h);
  }
}

// MR rows x NB packed blocks: MR * NB fp32 accumulators in registers; each 64-byte block load
// feeds MR dot products, each 4-byte pair of x (broadcast) feeds NB.
template <int MR, int NB>
void tile(const uint16_t* x, int64_t lda, const uint16_t* pk, const Layout& L, int64_t b0, void* y,
          int64_t ldy, bool fp32_out) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  const uint16_t* B = pk + b0 * L.K2 * 2 * kCols;
  const int64_t bstride = L.K2 * 2 * kCols;
  for (int64_t k = 0; k < L.K2; ++k) {
    __m512bh w[NB];
    for (int n = 0; n < NB; ++n) w[n] = (__m512bh)_mm512_loadu_si512(B + n * bstride + k * 2 * kCols);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * lda + 2 * k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, w[n]);
    }
  }
  if (L.gated) {
    for (int n = 0; n + 1 < NB; n += 2) {
      const int64_t col0 = (b0 + n) / 2 * kCols;
      const int64_t cols = L.n_out - col0;
      for (int m = 0; m < MR; ++m) {
        const __m512 g = acc[m][n];
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));  // silu(g)
        store_row(_mm512_mul_ps(s, acc[m][n + 1]), y, m * ldy + col0, cols, fp32_out);
      }
    }
  } else {
    for (int n = 0; n < NB; ++n) {
      const int64_t col0 = (b0 + n) * kCols;
      for (int m = 0; m < MR; ++m) store_row(acc[m][n], y, m * ldy + col0, L.n_out - col0, fp32_out);
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const Layout&, int64_t, void*, int64_t, bool);

template <int NB, int... Ms>
constexpr auto tile_table(std::integer_sequence<int, Ms...>) {
  return std::array<TileFn, sizeof...(Ms)>{&tile<Ms + 1, NB>...};
}

// register budget (32 zmm): MR * NB accumulators + NB weight vectors + 1 broadcast
constexpr int kMaxRows[5] = {0, 24, 12, 8, 6};  // for NB = 1, 2, 3, 4
const auto kTiles1 = tile_table<1>(std::make_integer_sequence<int, 24>{});
const auto kTiles2 = tile_table<2>(std::make_integer_sequence<int, 12>{});
const auto kTiles3 = tile_table<3>(std::make_integer_sequence<int, 8>{});
const auto kTiles4 = tile_table<4>(std::make_integer_sequence<int, 6>{});

TileFn pick(int nb, int rows) {
  switch (nb) {
    case 1: return kTiles1[rows - 1];
    case 2: return kTiles2[rows - 1];
    case 3: return kTiles3[rows - 1];
    default: return kTiles4[rows - 1];
  }
}
#endif

}  // namespace

at::Tensor pack_linear(const at::Tensor& w, bool gated) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(),
              "pack_linear: w must be a 2-D bf16 CPU tensor, got ", w.sizes(), " ", w.scalar_type());
  const Layout L = layout_for(w.size(0), w.size(1), gated);
  at::Tensor wc = w.contiguous();
  at::Tensor out = at::zeros({L.blocks, L.K2, 2 * kCols}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, L.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // gated: even blocks are gate columns, odd blocks the same columns of up (rows I.. of w)
      const int64_t col0 = (gated ? b / 2 : b) * kCols;
      const int64_t row_base = gated && (b % 2) ? L.n_out : 0;
      for (int64_t c = 0; c < kCols && col0 + c < L.n_out; ++c) {
        const uint16_t* row = src + (row_base + col0 + c) * L.K;
        uint16_t* d = dst + b * L.K2 * 2 * kCols + c * 2;
        for (int64_t k = 0; k < L.K2; ++k) {
          d[k * 2 * kCols] = row[2 * k];
          d[k * 2 * kCols + 1] = row[2 * k + 1];
        }
      }
    }
  });
  return out;
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n_out, bool gated, bool fp32_out,
                         int64_t impl) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.is_contiguous(),
              "linear_packed: x must be a contiguous 2-D bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == 2 * kCols,
              "linear_packed: packed must come from pack_linear, got ", packed.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) * 2 == K, "linear_packed: x has K=", K, " but the weight was packed for K=",
              packed.size(1) * 2);
  const Layout L = layout_for(gated ? 2 * n_out : n_out, K, gated);
  TORCH_CHECK(packed.size(0) == L.blocks, "linear_packed: n_out=", n_out, (gated ? " (gated)" : ""), " needs ",
              L.blocks, " packed blocks, the weight has ", packed.size(0));
  at::Tensor y = at::empty({M, n_out}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  if (M == 0 || n_out == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* pk = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  void* yp = y.data_ptr();
  const int esize = fp32_out ? 4 : 2;
#ifdef TREEPO_AVX512BF16
  if (impl == 0) {
    // 4 blocks x up to 6 rows per tile (measured best for 1-128 rows on Zen 4: each x pair is
    // broadcast once for 4 blocks); fewer blocks when a narrow layer would leave a thread idle
    int nb = 4;
    while (nb > (gated ? 2 : 1) && L.blocks / nb < 4 * at::get_num_threads()) nb = gated ? 2 : nb - 1;
    const int max_rows = kMaxRows[nb];
    const int64_t chunks = (M + max_rows - 1) / max_rows;
    const int64_t rows = (M + chunks - 1) / chunks;  // balanced chunks
    const int64_t groups = L.blocks / nb, tail = L.blocks % nb;
    at::parallel_for(0, groups + (tail ? 1 : 0), 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b0 = g * nb;
        const int this_nb = g < groups ? nb : static_cast<int>(tail);
        for (int64_t m0 = 0; m0 < M; m0 += rows) {
          const int r = static_cast<int>(std::min(rows, M - m0));
          // a tail group narrower than nb takes the 1- (or 2-, gated) block tiles, row-capped
          if (this_nb == nb) {
            pick(nb, r)(xp + m0 * K, K, pk, L, b0, static_cast<char*>(yp) + m0 * n_out * esize, n_out, fp32_out);
          } else {
            const int step = gated ? 2 : 1;
            for (int64_t b = b0; b < b0 + this_nb; b += step)
              for (int64_t mm = m0; mm < m0 + r; mm += 12) {
                const int rr = static_cast<int>(std::min<int64_t>(12, m0 + r - mm));
                pick(step, rr)(xp + mm * K, K, pk, L, b, static_cast<char*>(yp) + mm * n_out * esize, n_out,
                               fp32_out);
              }
          }
        }
      }
    });
    return y;
  }
#endif
  const int64_t step = gated ? 2 : 1;
  const int64_t pairs = L.blocks / step;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    portable_range(xp, K, pk, L, M, p0 * step, p1 * step, yp, fp32_out);
  });
  return y;
}

std::string gemm_impl() {
#ifdef TREEPO_AVX512BF16
  return "avx512bf16";
#else
  return "portable";
#endif
}

}  // namespace treepo
