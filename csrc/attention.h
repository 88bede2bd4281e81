// What the C++ attention kernels share (paged_kv.cpp, tree_decode.cpp, extend.cpp): fp32 loading
// of stored K/V, the per-task scratch, the page walk with an online softmax (`attend`), the task
// runner and the input checks. See docs/kernels.md, "C++ kernels".
//
// Layout (docs/kernels.md, "KV layout"): per layer K and V pools [num_pages, H_kv, page_size, D] in
// fp32 / bf16 / fp16; math in fp32. Work is cut into independent tasks (tree decode: unit x KV head
// x tile of leaves; extend: sequence x KV head x tile of queries). A task loads its queries for one
// KV head - the g query heads of every leaf packed as rows - walks its pages once with an online
// softmax, and writes normalised outputs + LSE (natural log). Threads take tasks from a shared
// counter (dynamic balance on torch's own thread pool); a task's result never depends on which
// thread ran it, so outputs are bit-identical for any thread count. A shared node's pages are
// converted to fp32 once per task and reused by all its rows.
//
// Batch invariance (docs/kernels.md, "Batch invariance"): with `fixed` set, `attend` computes every
// row's scores with the same instructions whatever the task's row count (K is always transposed),
// so a row's result depends on its own query and keys only; `finish_row` and `merge_row` are the
// one normalisation and the one LSE merge that tree decode and extend share, so an extend that
// cuts its keys into the same fixed chunks as a chunked decode plan reproduces it bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16.h"

namespace treepo::attention {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kKeyBlock = 16;    // score columns are computed in blocks of this many keys
constexpr int kTransposeRows = 8;  // tasks with at least this many rows transpose K pages

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return bf16_to_float(x.x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (softmax arguments) to ~2 ulp, written so the compiler vectorises it.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
void convert(const T* src, float* dst, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Per-task scratch, reused across tasks run by one thread.
struct Scratch {
  std::vector<float> q, o, m, l, alpha, k, kt, v, s;
  std::vector<float> part_o, part_lse;  // chunked extend: each row's chunk partials
  std::vector<int> limit;
  // sized for `rows` query rows, with empty softmax state (o = 0, m = -inf, l = 0)
  void start(int rows, int D, int P) {
    int PB = (P + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
    if ((int)q.size() < rows * D) q.resize(rows * D), o.resize(rows * D);
    if ((int)m.size() < rows) m.resize(rows), l.resize(rows), alpha.resize(rows), limit.resize(rows);
    if ((int)s.size() < rows * PB) s.resize(rows * PB);
    if ((int)k.size() < P * D) k.resize(P * D), v.resize(P * D);
    if ((int)kt.size() < D * PB) kt.resize(D * PB);
    reset(rows, D);
  }
  // empty softmax state for `rows` rows (the queries stay loaded)
  void reset(int rows, int D) {
    std::fill(o.begin(), o.begin() + rows * D, 0.0f);
    std::fill(m.begin(), m.begin() + rows, kNegInf);
    std::fill(l.begin(), l.begin() + rows, 0.0f);
  }
  // query rows row0 .. row0+g-1: the g heads (contiguous in q) of one token, scaled
  template <typename T>
  void load_heads(int row0, const T* src, int g, int D, float scale) {
    float* dst = q.data() + (int64_t)row0 * D;
    for (int i = 0; i < g * D; ++i) dst[i] = to_float(src[i]) * scale;
  }
};

// S[r, 0:PB] = q_r . K^T for RB rows at once (RB independent FMA chains per key block).
template <int RB>
inline void scores_t(const float* __restrict__ Q, const float* __restrict__ KT, float* __restrict__ S, int D,
                     int PB) {
  for (int jb = 0; jb < PB; jb += kKeyBlock) {
    float acc[RB][kKeyBlock] = {};
    for (int d = 0; d < D; ++d) {
      const float* __restrict__ kt = KT + d * PB + jb;
      for (int r = 0; r < RB; ++r) {
        const float qd = Q[r * D + d];
#pragma omp simd
        for (int j = 0; j < kKeyBlock; ++j) acc[r][j] += qd * kt[j];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < kKeyBlock; ++j) S[r * PB + jb + j] = acc[r][j];
  }
}

// O[r] = alpha[r] * O[r] + sum_j P[r, j] V[j] for RB rows, accumulators in registers.
template <int DC, int RB>
inline void pv_block(float* __restrict__ O, const float* __restrict__ Pm, const float* __restrict__ alpha,
                     const float* __restrict__ V, int cnt, int PB) {
  float acc[RB][DC];
  for (int r = 0; r < RB; ++r)
#pragma omp simd
    for (int d = 0; d < DC; ++d) acc[r][d] = O[r * DC + d] * alpha[r];
  for (int j = 0; j < cnt; ++j) {
    const float* __restrict__ v = V + j * DC;
    for (int r = 0; r < RB; ++r) {
      const float p = Pm[r * PB + j];
#pragma omp simd
      for (int d = 0; d < DC; ++d) acc[r][d] += p * v[d];
    }
  }
  for (int r = 0; r < RB; ++r)
#pragma omp simd
    for (int d = 0; d < DC; ++d) O[r * DC + d] = acc[r][d];
}

// Attention of `rows` fp32 query rows (already scaled) over the tokens [start, start + n) held in
// `pages` (page i holds tokens start + i*P ...), for KV head `h`. Row r sees token t only when
// t < limit[r] (limit == nullptr: all). Accumulates into sc.o / sc.m / sc.l (online softmax).
// DC is the head dim when known at compile time (32/64/128: the row accumulators then live in
// registers), 0 for any other head dim. `fixed`: the same score arithmetic for any row count (K
// transposed even for one row), so each row's result does not depend on how many rows the task has.
template <typename T, int DC>
void attend_d(Scratch& sc, int rows, int d_runtime, const int* limit, const T* kc, const T* vc,
              int64_t page_stride, int64_t head_off, int P, const int32_t* pages, int n, int64_t start,
              bool fixed) {
  const int D = DC > 0 ? DC : d_runtime;
  const int PB = (P + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const bool transpose = fixed || rows >= kTransposeRows;
  float* __restrict__ Q = sc.q.data();
  float* __restrict__ O = sc.o.data();
  float* __restrict__ S = sc.s.data();
  float* __restrict__ K = sc.k.data();
  float* __restrict__ KT = sc.kt.data();
  float* __restrict__ V = sc.v.data();
  const int n_pages = (n + P - 1) / P;
  for (int i = 0; i < n_pages; ++i) {
    const int cnt = std::min(P, n - i * P);
    const int64_t t0 = start + (int64_t)i * P;
    const int64_t base = (int64_t)pages[i] * page_stride + head_off;
    convert(kc + base, K, cnt * D);
    convert(vc + base, V, cnt * D);
    // scores S[r, j] for j < cnt
    if (transpose) {  // many rows: K^T once, then 16 keys per vector, 8 rows at a time
      for (int j = 0; j < cnt; ++j)
        for (int d = 0; d < D; ++d) KT[d * PB + j] = K[j * D + d];
      for (int d = 0; d < D; ++d)
        for (int j = cnt; j < PB; ++j) KT[d * PB + j] = 0.0f;
      int r = 0;
      for (; r + 8 <= rows; r += 8) scores_t<8>(Q + r * D, KT, S + r * PB, D, PB);
      for (; r < rows; ++r) scores_t<1>(Q + r * D, KT, S + r * PB, D, PB);
    } else {  // few rows (plain decode: the g heads of one leaf): dot products
      for (int j = 0; j < cnt; ++j) {
        const float* __restrict__ k = K + j * D;
        for (int r = 0; r < rows; ++r) {
          const float* __restrict__ q = Q + r * D;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int d = 0; d < D; ++d) acc += q[d] * k[d];
          S[r * PB + j] = acc;
        }
      }
    }
    // online softmax: S becomes the probabilities (0 where masked), alpha[r] rescales the row
    float* __restrict__ alpha = sc.alpha.data();
    for (int r = 0; r < rows; ++r) {
      float* __restrict__ s = S + r * PB;
      int visible = cnt;
      if (limit) visible = (int)std::max<int64_t>(0, std::min<int64_t>(cnt, limit[r] - t0));
      if (visible == 0) {
        alpha[r] = 1.0f;
        for (int j = 0; j < PB; ++j) s[j] = 0.0f;
        continue;
      }
      float mx = sc.m[r];
      for (int j = 0; j < visible; ++j) mx = std::max(mx, s[j]);
      alpha[r] = exp_neg(sc.m[r] - mx);  // m == -inf -> ~0, and o, l are 0 then anyway
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < PB; ++j) {
        const float p = j < visible ? exp_neg(s[j] - mx) : 0.0f;
        s[j] = p;
        sum += p;
      }
      sc.m[r] = mx;
      sc.l[r] = sc.l[r] * alpha[r] + sum;
    }
    // O = alpha * O + P V, several rows at a time so their accumulators stay in registers
    if constexpr (DC > 0) {
      constexpr int RB = DC >= 128 ? 2 : (DC >= 64 ? 4 : 8);
      int r = 0;
      for (; r + RB <= rows; r += RB) pv_block<DC, RB>(O + r * DC, S + r * PB, alpha + r, V, cnt, PB);
      for (int b = RB / 2; b >= 1; b /= 2)  // the rest in blocks of RB/2, ..., 2, 1 rows (3 = 2 + 1)
        if (rows - r >= b) {
          if (b == 4) pv_block<DC, 4>(O + r * DC, S + r * PB, alpha + r, V, cnt, PB);
          if (b == 2) pv_block<DC, 2>(O + r * DC, S + r * PB, alpha + r, V, cnt, PB);
          if (b == 1) pv_block<DC, 1>(O + r * DC, S + r * PB, alpha + r, V, cnt, PB);
          r += b;
        }
      if (r < rows) pv_block<DC, 1>(O + r * DC, S + r * PB, alpha + r, V, cnt, PB), ++r;
      TORCH_CHECK(r == rows);
    } else {
      for (int r = 0; r < rows; ++r) {
        float* __restrict__ o = O + r * D;
        const float* __restrict__ s = S + r * PB;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] *= alpha[r];
        for (int j = 0; j < cnt; ++j) {
          const float p = s[j];
          const float* __restrict__ v = V + j * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] += p * v[d];
        }
      }
    }
  }
}

template <typename T>
void attend(Scratch& sc, int rows, int D, const int* limit, const T* kc, const T* vc, int64_t page_stride,
            int64_t head_off, int P, const int32_t* pages, int n, int64_t start, bool fixed = false) {
  switch (D) {
    case 32: return attend_d<T, 32>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start, fixed);
    case 64: return attend_d<T, 64>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start, fixed);
    case 128:
      return attend_d<T, 128>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start, fixed);
    default: return attend_d<T, 0>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start, fixed);
  }
}

// Row r's normalised partial: dst[0:D] = o / l, returns its LSE (m + log l); a row that saw no key
// gives zeros and -inf (it contributes nothing to a merge).
inline float finish_row(const Scratch& sc, int r, int D, float* dst) {
  const float l = sc.l[r];
  if (!(l > 0.0f)) {
    std::fill(dst, dst + D, 0.0f);
    return kNegInf;
  }
  const float inv = 1.0f / l;
  for (int d = 0; d < D; ++d) dst[d] = sc.o[(int64_t)r * D + d] * inv;
  return sc.m[r] + std::log(l);
}

// LSE merge of n partials in the given order: out = sum_k exp(lse_k - m) o_k / sum_k exp(lse_k - m),
// m the largest LSE; partial k is (part_o(k) [D], part_lse(k)), -inf ones are skipped. acc: D floats
// of scratch. Writes dst [D] in T and returns the merged LSE (-inf if every partial is empty).
template <typename T, typename O, typename L>
inline float merge_row(int64_t n, const O& part_o, const L& part_lse, int64_t D, float* acc, T* dst) {
  float mx = kNegInf;
  for (int64_t k = 0; k < n; ++k) mx = std::max(mx, part_lse(k));
  std::fill(acc, acc + D, 0.0f);
  float total = 0.0f;
  if (mx != kNegInf) {
    for (int64_t k = 0; k < n; ++k) {
      const float lse = part_lse(k);
      if (lse == kNegInf) continue;
      const float w = std::exp(lse - mx);
      total += w;
      const float* __restrict__ src = part_o(k);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * inv);
  return total > 0.0f ? mx + std::log(total) : kNegInf;
}

// Runs fn(task) for task in [0, n) on torch's thread pool, tasks handed out by a shared counter
// in the given order (put the most expensive first).
template <typename F>
void run_tasks(int64_t n, const F& fn) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch sc;
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(sc, t);
  });
}

inline void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_pages, H_kv, page_size, D], got ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.device().is_cpu(), "treepo CPU kernels need CPU tensors");
}

inline void check_index(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() <= 2 && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

}  // namespace treepo::attention
