// tree_decode(q, k_cache, v_cache, <TreePlan CSR arrays>, scale) -> (out, lse): the C++ version of
// treepo_kernels/tree_decode.py (docs/kernels.md, "Tree decode"). Phase 1: one task per (unit, tile
// of kLeafTile leaves, KV head) attends the unit's pages - read and converted once for all its
// leaves - and writes one normalised partial (output, LSE) per (unit, leaf). Phase 2: each leaf
// merges its partials by LSE in plan order (root first), so the result does not depend on the
// thread count. `fixed` (batch-invariant mode, with a chunked plan from tree_plan.plan_chunked):
// every row's scores take the same instructions whatever the task's row count, so a leaf's output
// depends on its own query and its plan's key ranges only (docs/kernels.md, "Batch invariance").
#include "attention.h"
#include "ops.h"

namespace treepo {

using namespace attention;

namespace {

constexpr int kLeafTile = 32;  // leaves per tree-decode task (rows = leaves * g)

template <typename T>
void tree_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const int32_t* unit_page_ptr, const int32_t* unit_pages, const int32_t* unit_len,
                      const int32_t* unit_leaf_ptr, const int32_t* unit_leaves, int64_t num_units, float scale,
                      bool fixed, at::Tensor& part_o, at::Tensor& part_lse) {
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
              unit_len[tk.unit], 0, fixed);
    for (int i = 0; i < tk.leaf1 - tk.leaf0; ++i)
      for (int j = 0; j < g; ++j) {
        const int64_t slot = (int64_t)(tk.leaf0 + i) * Hq + tk.head * g + j;
        pl[slot] = finish_row(sc, i * g + j, D, po + slot * D);  // an empty unit: -inf, contributes nothing
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
      const int32_t* parts = leaf_parts + leaf_part_ptr[b];
      auto slot = [&](int64_t k) { return (int64_t)parts[k] * Hq + h; };
      ld[i] = merge_row(
          leaf_part_ptr[b + 1] - leaf_part_ptr[b], [&](int64_t k) { return po + slot(k) * D; },
          [&](int64_t k) { return pl[slot(k)]; }, D, acc.data(), od + i * D);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& unit_page_ptr,
                                               const at::Tensor& unit_pages, const at::Tensor& unit_len,
                                               const at::Tensor& unit_leaf_ptr, const at::Tensor& unit_leaves,
                                               const at::Tensor& leaf_part_ptr, const at::Tensor& leaf_parts,
                                               double scale, bool fixed) {
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
    tree_decode_impl<scalar_t>(qc, k_cache, v_cache, upp, up, ul, ulp, ulv, U, (float)scale, fixed, part_o, part_lse);
    merge_impl<scalar_t>(part_o, part_lse, lpp, lp, B, out, lse);
  });
  return {out, lse};
}

}  // namespace treepo
