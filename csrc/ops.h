// Every torch op of treepo_kernels._C, declared once; module.cpp registers them as torch.ops.treepo.*
// (the schemas there), each .cpp defines its own. Contracts: the Python launchers in
// treepo_kernels/cpu.py; each op checks its inputs (TORCH_CHECK) before touching memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace treepo {

// paged_kv.cpp: K/V of T new tokens into their pages, in place
void append_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slot_pages, const at::Tensor& slot_offsets);

// tree_decode.cpp: one query per leaf of a TreePlan (its CSR arrays) -> (out, lse)
std::tuple<at::Tensor, at::Tensor> tree_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& unit_page_ptr,
                                               const at::Tensor& unit_pages, const at::Tensor& unit_len,
                                               const at::Tensor& unit_leaf_ptr, const at::Tensor& unit_leaves,
                                               const at::Tensor& leaf_part_ptr, const at::Tensor& leaf_parts,
                                               double scale, bool fixed);

// extend.cpp: the new tokens of B sequences over their paged context -> (out, lse); chunk > 0:
// keys cut into chunks of that many tokens, merged as a chunked tree decode would (batch invariance)
std::tuple<at::Tensor, at::Tensor> paged_extend(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                                const at::Tensor& cu_q, const at::Tensor& kv_lens, double scale,
                                                int64_t chunk);

// linear.cpp: bf16 weights packed once, then x W^T (optionally the gated MLP input side)
at::Tensor pack_linear(const at::Tensor& w, bool gated);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n_out, bool gated, bool fp32_out,
                         int64_t impl);
std::string gemm_impl();

// layer_ops.cpp: fused RMSNorm, residual add + RMSNorm, rotary embedding of q and k
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& r, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t Hq, int64_t Hkv);

}  // namespace treepo
