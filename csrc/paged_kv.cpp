// append_kv(k_cache!, v_cache!, k, v, slot_pages, slot_offsets): the C++ version of
// treepo_kernels/paged_kv.py's `append_kv_ref` - token t's K/V [H_kv, D] copied into page
// slot_pages[t] at offset slot_offsets[t], every slot checked before anything is written.
#include "attention.h"
#include "ops.h"

namespace treepo {

using namespace attention;

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

}  // namespace treepo
