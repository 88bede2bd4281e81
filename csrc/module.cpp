// The Python module `treepo_kernels._C`: importing it registers every torch op of this folder as
// torch.ops.treepo.* (the only TORCH_LIBRARY of the extension; ops.h declares the functions). It
// holds no Python functions of its own. Python launchers with each op's contract:
// treepo_kernels/cpu.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

static struct PyModuleDef treepo_c_module = {PyModuleDef_HEAD_INIT, "_C", "treepo CPU kernels (torch.ops.treepo)",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&treepo_c_module); }

TORCH_LIBRARY(treepo, m) {
  // attention over the paged KV cache (paged_kv.cpp, tree_decode.cpp, extend.cpp)
  m.def("append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_pages, "
        "Tensor slot_offsets) -> ()");
  m.def("tree_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor unit_page_ptr, Tensor unit_pages, "
        "Tensor unit_len, Tensor unit_leaf_ptr, Tensor unit_leaves, Tensor leaf_part_ptr, Tensor leaf_parts, "
        "float scale, bool fixed) -> (Tensor, Tensor)");
  m.def("paged_extend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_q, "
        "Tensor kv_lens, float scale, int chunk) -> (Tensor, Tensor)");
  // packed GEMMs (linear.cpp)
  m.def("pack_linear(Tensor w, bool gated) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed, int n_out, bool gated, bool fp32_out, int impl) -> Tensor");
  m.def("gemm_impl() -> str", &treepo::gemm_impl);
  // fused layer ops (layer_ops.cpp)
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor r, Tensor w, float eps) -> Tensor");
  m.def("rope_qkv(Tensor qkv, Tensor cos, Tensor sin, int hq, int hkv) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treepo, CPU, m) {
  m.impl("append_kv", &treepo::append_kv);
  m.impl("tree_decode", &treepo::tree_decode);
  m.impl("paged_extend", &treepo::paged_extend);
  m.impl("pack_linear", &treepo::pack_linear);
  m.impl("linear_packed", &treepo::linear_packed);
  m.impl("rms_norm", &treepo::rms_norm);
  m.impl("add_rms_norm", &treepo::add_rms_norm);
  m.impl("rope_qkv", &treepo::rope_qkv);
}
