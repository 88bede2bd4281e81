// paged_extend(q, k_cache, v_cache, block_tables, cu_q, kv_lens, scale) -> (out, lse): the C++
// version of treepo_kernels/extend.py's `paged_attention_ref` (docs/kernels.md, "Extend"): query i
// of sequence b sits at position kv_lens[b] - q_lens[b] + i and attends to every key at or before
// it. One task per (sequence, tile of kQueryTile queries, KV head); the tile's rows walk the
// sequence's pages up to its last query, each row masked at its own position.
//
// chunk > 0 (batch-invariant mode, docs/kernels.md "Batch invariance"): the keys are cut into
// chunks of `chunk` tokens at fixed positions (0, chunk, 2 chunk, ...); each row attends to each
// chunk from an empty softmax state, the chunk partials are normalised and merged by LSE in chunk
// order - exactly what tree decode computes for a decode row on a chunked plan
// (tree_plan.plan_chunked) - so a token's output, and the K/V computed from it, do not depend on
// whether it was decoded or (re)computed by an extend, nor on the other tokens of the tile.
#include "attention.h"
#include "ops.h"

namespace treepo {

using namespace attention;

namespace {

constexpr int kQueryTile = 16;  // queries per extend task

template <typename T>
void extend_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int32_t* tables,
                 int64_t max_pages, const int64_t* cu_q, const int64_t* kv_lens, int64_t B, float scale,
                 int64_t chunk, at::Tensor& out, at::Tensor& lse) {
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
    const int32_t* table = tables + tk.seq * max_pages;
    if (chunk > 0) {  // fixed chunks, merged as tree decode merges a chunked plan's partials
      const int64_t n_keys = first_pos + n_q, n_chunks = (n_keys + chunk - 1) / chunk;
      const int64_t need = (int64_t)rows * n_chunks;
      if ((int64_t)sc.part_lse.size() < need) sc.part_lse.resize(need), sc.part_o.resize(need * D);
      for (int64_t c = 0; c < n_chunks; ++c) {
        if (c > 0) sc.reset(rows, D);
        const int64_t c0 = c * chunk;
        attend<T>(sc, rows, D, sc.limit.data(), kc, vc, page_stride, tk.head * P * D, P, table + c0 / P,
                  (int)std::min(chunk, n_keys - c0), c0, true);
        for (int r = 0; r < rows; ++r)
          sc.part_lse[r * n_chunks + c] = finish_row(sc, r, D, sc.part_o.data() + (r * n_chunks + c) * D);
      }
      std::vector<float> acc(D);
      for (int i = 0; i < n_q; ++i)
        for (int j = 0; j < g; ++j) {
          const int64_t r = i * g + j, row = (tk.tok0 + i) * Hq + tk.head * g + j;
          ld[row] = merge_row(
              n_chunks, [&](int64_t k) { return sc.part_o.data() + (r * n_chunks + k) * D; },
              [&](int64_t k) { return sc.part_lse[r * n_chunks + k]; }, D, acc.data(), od + row * D);
        }
      return;
    }
    attend<T>(sc, rows, D, sc.limit.data(), kc, vc, page_stride, tk.head * P * D, P, table, (int)(first_pos + n_q),
              0);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> paged_extend(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                                const at::Tensor& cu_q, const at::Tensor& kv_lens, double scale,
                                                int64_t chunk) {
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
  TORCH_CHECK(chunk >= 0 && chunk % P == 0, "chunk=", chunk, " must be 0 (off) or a positive multiple of the page size ",
              P);
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
    extend_impl<scalar_t>(qc, k_cache, v_cache, bt, max_pages, cq, kl, B, (float)scale, chunk, out, lse);
  });
  return {out, lse};
}

}  // namespace treepo
