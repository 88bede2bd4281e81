// CPU kernels for paged tree attention, registered as torch ops `torch.ops.treepo.*`.
//
// Same contracts as the plain-PyTorch references in treepo_kernels/ (layout in KERNELS.md):
// per layer K and V pools [num_pages, H_kv, page_size, D] in fp32 / bf16 / fp16; math in fp32.
//
//   append_kv(k_cache!, v_cache!, k, v, slot_pages, slot_offsets)
//   tree_decode(q, k_cache, v_cache, <TreePlan CSR arrays>, scale) -> (out, lse)
//   paged_extend(q, k_cache, v_cache, block_tables, cu_q, kv_lens, scale) -> (out, lse)
//
// Work is cut into independent tasks (tree decode: unit x KV head x tile of leaves; extend:
// sequence x KV head x tile of queries). A task loads its queries for one KV head - the g query
// heads of every leaf packed as rows - walks its pages once with an online softmax, and writes
// normalised partial outputs + LSE (natural log). Threads take tasks from a shared counter
// (dynamic balance on torch's own thread pool); a task's result never depends on which thread ran
// it, and each leaf merges its partials in plan order, so outputs are bit-identical for any thread
// count. A shared node's pages are converted to fp32 once per task and reused by all its rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace treepo {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kKeyBlock = 16;    // score columns are computed in blocks of this many keys
constexpr int kLeafTile = 32;    // leaves per tree-decode task (rows = leaves * g)
constexpr int kQueryTile = 16;   // queries per extend task
constexpr int kTransposeRows = 8;  // tasks with at least this many rows transpose K pages

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
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
  std::vector<int> limit;
  // sized for `rows` query rows, with empty softmax state (o = 0, m = -inf, l = 0)
  void start(int rows, int D, int P) {
    int PB = (P + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
    if ((int)q.size() < rows * D) q.resize(rows * D), o.resize(rows * D);
    if ((int)m.size() < rows) m.resize(rows), l.resize(rows), alpha.resize(rows), limit.resize(rows);
    if ((int)s.size() < rows * PB) s.resize(rows * PB);
    if ((int)k.size() < P * D) k.resize(P * D), v.resize(P * D);
    if ((int)kt.size() < D * PB) kt.resize(D * PB);
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
// registers), 0 for any other head dim.
template <typename T, int DC>
void attend_d(Scratch& sc, int rows, int d_runtime, const int* limit, const T* kc, const T* vc,
              int64_t page_stride, int64_t head_off, int P, const int32_t* pages, int n, int64_t start) {
  const int D = DC > 0 ? DC : d_runtime;
  const int PB = (P + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const bool transpose = rows >= kTransposeRows;
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
            int64_t head_off, int P, const int32_t* pages, int n, int64_t start) {
  switch (D) {
    case 32: return attend_d<T, 32>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start);
    case 64: return attend_d<T, 64>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start);
    case 128: return attend_d<T, 128>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start);
    default: return attend_d<T, 0>(sc, rows, D, limit, kc, vc, page_stride, head_off, P, pages, n, start);
  }
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

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_pages, H_kv, page_size, D], got ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.device().is_cpu(), "treepo CPU kernels need CPU tensors");
}

void check_index(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() <= 2 && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

// ----------------------------------------------------------------------------------- append

void append_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slot_pages, const at::Tensor& slot_offsets) {
  check_cache(k_cache, v_cache);
  const int64_t T = k.size(0), Hkv = k_cache.size(1), P = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == Hkv && k.size(2) == D && k.sizes() == v.sizes(),
              "k/v must be [T, H_kv, D] matching the cache, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "k/v dtype must equal the cache dtype");
  check_index(slot_pages, at::kLong, "slot_pages");
  check_index(slot_offsets, at::kLong, "slot_offsets");
  TORCH_CHECK(slot_pages.numel() == T && slot_offsets.numel() == T, "one slot per token");
  auto kk = k.contiguous(), vv = v.contiguous();
  const int64_t* pg = slot_pages.data_ptr<int64_t>();
  const int64_t* off = slot_offsets.data_ptr<int64_t>();
  const int64_t n_pages = k_cache.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pg[t] >= 0 && pg[t] < n_pages && off[t] >= 0 && off[t] < P, "slot (", pg[t], ", ", off[t],
                ") of token ", t, " is outside the cache");
  const int64_t bytes = D * k_cache.element_size();
  auto* kd = static_cast<char*>(k_cache.data_ptr());
  auto* vd = static_cast<char*>(v_cache.data_ptr());
  auto* ks = static_cast<const char*>(kk.data_ptr());
  auto* vs = static_cast<const char*>(vv.data_ptr());
  at::parallel_for(0, T * Hkv, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      const int64_t dst = ((pg[t] * Hkv + h) * P + off[t]) * bytes;
      std::memcpy(kd + dst, ks + i * bytes, bytes);
      std::memcpy(vd + dst, vs + i * bytes, bytes);
    }
  });
}

// ----------------------------------------------------------------------------------- decode

template <typename T>
void tree_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const int32_t* unit_page_ptr, const int32_t* unit_pages, const int32_t* unit_len,
                      const int32_t* unit_leaf_ptr, const int32_t* unit_leaves, int64_t num_units, float scale,
                      at::Tensor& part_o, at::Tensor& part_lse) {
  const int Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), P = k_cache.size(2);
  const int g = Hq / Hkv;
  const T* qd = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  float* po = part_o.data_ptr<float>();
  float* pl = part_lse.data_ptr<float>();
  const int64_t page_stride = (int64_t)Hkv * P * D;
  // tasks: (unit, leaf tile, kv head), most work first
  struct Task { int32_t unit, leaf0, leaf1, head; int64_t cost; };
  std::vector<Task> tasks;
  for (int32_t u = 0; u < num_units; ++u) {
    const int32_t l0 = unit_leaf_ptr[u], l1 = unit_leaf_ptr[u + 1];
    for (int32_t a = l0; a < l1; a += kLeafTile)
      for (int32_t h = 0; h < Hkv; ++h) {
        const int32_t b = std::min(l1, a + kLeafTile);
        tasks.push_back({u, a, b, h, (int64_t)unit_len[u] * (b - a + 4)});
      }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  run_tasks((int64_t)tasks.size(), [&](Scratch& sc, int64_t ti) {
    const Task& tk = tasks[ti];
    const int rows = (tk.leaf1 - tk.leaf0) * g;
    sc.start(rows, D, P);
    for (int i = 0; i < tk.leaf1 - tk.leaf0; ++i)
      sc.load_heads(i * g, qd + ((int64_t)unit_leaves[tk.leaf0 + i] * Hq + tk.head * g) * D, g, D, scale);
    const int32_t p0 = unit_page_ptr[tk.unit];
    attend<T>(sc, rows, D, nullptr, kc, vc, page_stride, (int64_t)tk.head * P * D, P, unit_pages + p0,
              unit_len[tk.unit], 0);
    for (int i = 0; i < tk.leaf1 - tk.leaf0; ++i)
      for (int j = 0; j < g; ++j) {
        const int r = i * g + j;
        const int64_t slot = (int64_t)(tk.leaf0 + i) * Hq + tk.head * g + j;
        float* dst = po + slot * D;
        const float l = sc.l[r];
        if (l > 0.0f) {
          const float inv = 1.0f / l;
          for (int d = 0; d < D; ++d) dst[d] = sc.o[r * D + d] * inv;
          pl[slot] = sc.m[r] + std::log(l);
        } else {  // empty unit: contributes nothing
          std::fill(dst, dst + D, 0.0f);
          pl[slot] = kNegInf;
        }
      }
  });
}

template <typename T>
void merge_impl(const at::Tensor& part_o, const at::Tensor& part_lse, const int32_t* leaf_part_ptr,
                const int32_t* leaf_parts, int64_t B, at::Tensor& out, at::Tensor& lse) {
  const int64_t Hq = part_o.size(1), D = part_o.size(2);
  const float* po = part_o.data_ptr<float>();
  const float* pl = part_lse.data_ptr<float>();
  T* od = out.data_ptr<T>();
  float* ld = lse.data_ptr<float>();
  at::parallel_for(0, B * Hq, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(D);
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t b = i / Hq, h = i % Hq;
      const int32_t a = leaf_part_ptr[b], e = leaf_part_ptr[b + 1];
      float mx = kNegInf;
      for (int32_t k = a; k < e; ++k) mx = std::max(mx, pl[(int64_t)leaf_parts[k] * Hq + h]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      if (mx != kNegInf) {
        for (int32_t k = a; k < e; ++k) {
          const int64_t slot = (int64_t)leaf_parts[k] * Hq + h;
          if (pl[slot] == kNegInf) continue;
          const float w = std::exp(pl[slot] - mx);
          total += w;
          const float* src = po + slot * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
        }
      }
      T* dst = od + i * D;
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * inv);
      ld[i] = total > 0.0f ? mx + std::log(total) : kNegInf;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> tree_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& unit_page_ptr,
                                               const at::Tensor& unit_pages, const at::Tensor& unit_len,
                                               const at::Tensor& unit_leaf_ptr, const at::Tensor& unit_leaves,
                                               const at::Tensor& leaf_part_ptr, const at::Tensor& leaf_parts,
                                               double scale) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k_cache.size(3), "q must be [B, H_q, D] with the cache's D, got ",
              q.sizes());
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "H_q=", q.size(1), " is not a multiple of H_kv=", k_cache.size(1));
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q dtype must equal the cache dtype");
  for (auto* t : {&unit_page_ptr, &unit_pages, &unit_len, &unit_leaf_ptr, &unit_leaves, &leaf_part_ptr, &leaf_parts})
    check_index(*t, at::kInt, "plan arrays");
  const int64_t U = unit_len.numel(), B = q.size(0), parts = unit_leaves.numel();
  TORCH_CHECK(unit_page_ptr.numel() == U + 1 && unit_leaf_ptr.numel() == U + 1 && leaf_part_ptr.numel() == B + 1,
              "plan arrays do not match: ", U, " units, ", B, " leaves");
  // validate indices once, so the kernel never reads outside its tensors
  const int32_t* upp = unit_page_ptr.data_ptr<int32_t>();
  const int32_t* up = unit_pages.data_ptr<int32_t>();
  const int32_t* ul = unit_len.data_ptr<int32_t>();
  const int32_t* ulp = unit_leaf_ptr.data_ptr<int32_t>();
  const int32_t* ulv = unit_leaves.data_ptr<int32_t>();
  const int32_t* lpp = leaf_part_ptr.data_ptr<int32_t>();
  const int32_t* lp = leaf_parts.data_ptr<int32_t>();
  const int64_t P = k_cache.size(2), n_pages = k_cache.size(0);
  TORCH_CHECK(upp[U] == unit_pages.numel() && ulp[U] == parts && lpp[B] == leaf_parts.numel(), "plan pointers");
  for (int64_t u = 0; u < U; ++u)
    TORCH_CHECK(ul[u] >= 0 && (int64_t)(upp[u + 1] - upp[u]) * P >= ul[u] && ulp[u + 1] >= ulp[u],
                "unit ", u, ": ", ul[u], " tokens in ", upp[u + 1] - upp[u], " pages");
  for (int64_t i = 0; i < unit_pages.numel(); ++i)
    TORCH_CHECK(up[i] >= 0 && up[i] < n_pages, "page id ", up[i], " is outside the cache");
  for (int64_t i = 0; i < parts; ++i) TORCH_CHECK(ulv[i] >= 0 && ulv[i] < B, "leaf ", ulv[i], " out of range");
  for (int64_t i = 0; i < leaf_parts.numel(); ++i) TORCH_CHECK(lp[i] >= 0 && lp[i] < parts, "partial slot");
  auto qc = q.contiguous();
  auto f32 = q.options().dtype(at::kFloat);
  auto part_o = at::empty({parts, q.size(1), q.size(2)}, f32);
  auto part_lse = at::empty({parts, q.size(1)}, f32);
  auto out = at::empty_like(qc);
  auto lse = at::empty({B, q.size(1)}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_decode", [&] {
    tree_decode_impl<scalar_t>(qc, k_cache, v_cache, upp, up, ul, ulp, ulv, U, (float)scale, part_o, part_lse);
    merge_impl<scalar_t>(part_o, part_lse, lpp, lp, B, out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------- extend

template <typename T>
void extend_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int32_t* tables,
                 int64_t max_pages, const int64_t* cu_q, const int64_t* kv_lens, int64_t B, float scale,
                 at::Tensor& out, at::Tensor& lse) {
  const int Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), P = k_cache.size(2);
  const int g = Hq / Hkv;
  const T* qd = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  T* od = out.data_ptr<T>();
  float* ld = lse.data_ptr<float>();
  const int64_t page_stride = (int64_t)Hkv * P * D;
  struct Task { int64_t seq, tok0, tok1, head, cost; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t a = cu_q[b]; a < cu_q[b + 1]; a += kQueryTile)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t e = std::min(cu_q[b + 1], a + kQueryTile);
        const int64_t last_pos = kv_lens[b] - (cu_q[b + 1] - e);  // keys seen by the tile's last query
        tasks.push_back({b, a, e, h, last_pos * (e - a + 4)});
      }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  run_tasks((int64_t)tasks.size(), [&](Scratch& sc, int64_t ti) {
    const Task& tk = tasks[ti];
    const int n_q = tk.tok1 - tk.tok0, rows = n_q * g;
    sc.start(rows, D, P);
    const int64_t first_pos = kv_lens[tk.seq] - (cu_q[tk.seq + 1] - tk.tok0);  // position of the first query
    for (int i = 0; i < n_q; ++i) {
      sc.load_heads(i * g, qd + ((tk.tok0 + i) * Hq + tk.head * g) * D, g, D, scale);
      std::fill(sc.limit.begin() + i * g, sc.limit.begin() + (i + 1) * g, (int)(first_pos + i + 1));
    }
    attend<T>(sc, rows, D, sc.limit.data(), kc, vc, page_stride, tk.head * P * D, P, tables + tk.seq * max_pages,
              (int)(first_pos + n_q), 0);
    for (int i = 0; i < n_q; ++i)
      for (int j = 0; j < g; ++j) {
        const int r = i * g + j;
        const int64_t row = (tk.tok0 + i) * Hq + tk.head * g + j;
        const float inv = 1.0f / sc.l[r];  // every query sees at least itself
        for (int d = 0; d < D; ++d) od[row * D + d] = static_cast<T>(sc.o[r * D + d] * inv);
        ld[row] = sc.m[r] + std::log(sc.l[r]);
      }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_extend(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                                const at::Tensor& cu_q, const at::Tensor& kv_lens, double scale) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k_cache.size(3), "q must be [T, H_q, D] with the cache's D, got ",
              q.sizes());
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "H_q=", q.size(1), " is not a multiple of H_kv=", k_cache.size(1));
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q dtype must equal the cache dtype");
  check_index(block_tables, at::kInt, "block_tables");
  check_index(cu_q, at::kLong, "cu_q");
  check_index(kv_lens, at::kLong, "kv_lens");
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be [B, max_pages]");
  const int64_t B = block_tables.size(0), max_pages = block_tables.size(1), P = k_cache.size(2);
  TORCH_CHECK(cu_q.numel() == B + 1 && kv_lens.numel() == B, "cu_q must be [B+1] and kv_lens [B]");
  const int64_t* cq = cu_q.data_ptr<int64_t>();
  const int64_t* kl = kv_lens.data_ptr<int64_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(cq[0] == 0 && cq[B] == q.size(0), "cu_q must run from 0 to T");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cq[b + 1] - cq[b];
    TORCH_CHECK(n >= 0 && kl[b] >= n && (kl[b] + P - 1) / P <= max_pages, "sequence ", b, ": ", n,
                " new tokens, kv_len ", kl[b], ", ", max_pages, " pages in its table");
    for (int64_t i = 0; i < (kl[b] + P - 1) / P; ++i)
      TORCH_CHECK(bt[b * max_pages + i] >= 0 && bt[b * max_pages + i] < k_cache.size(0), "page id ",
                  bt[b * max_pages + i], " is outside the cache");
  }
  auto qc = q.contiguous();
  auto out = at::empty_like(qc);
  auto lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_extend", [&] {
    extend_impl<scalar_t>(qc, k_cache, v_cache, bt, max_pages, cq, kl, B, (float)scale, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(treepo, m) {
  m.def("append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_pages, "
        "Tensor slot_offsets) -> ()");
  m.def("tree_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor unit_page_ptr, Tensor unit_pages, "
        "Tensor unit_len, Tensor unit_leaf_ptr, Tensor unit_leaves, Tensor leaf_part_ptr, Tensor leaf_parts, "
        "float scale) -> (Tensor, Tensor)");
  m.def("paged_extend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_q, "
        "Tensor kv_lens, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treepo, CPU, m) {
  m.impl("append_kv", &append_kv);
  m.impl("tree_decode", &tree_decode);
  m.impl("paged_extend", &paged_extend);
}

}  // namespace treepo
