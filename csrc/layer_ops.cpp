// The small per-layer steps of the engine's CPU decode forward, fused: one op where the PyTorch
// model runs eight (RMSNorm) or twelve (rotary embedding of q and k).
//
//   rms_norm(x [T, H] bf16, w [H] bf16, eps) -> [T, H] bf16
//   add_rms_norm(x! [T, H] bf16, r [T, H] bf16, w, eps) -> [T, H] bf16: x += r in place (the
//       residual stream), then the norm of the new x
//   rope_qkv(qkv [T, (Hq + 2 Hkv) D] bf16, cos [T, D] bf16, sin [T, D] bf16, Hq, Hkv)
//       -> (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) bf16, q and k rotated (rotate-half RoPE)
//
// Rounding follows the model: the norm is computed in fp32 and rounded to bf16 before the weight
// multiply (as transformers' LlamaRMSNorm); the residual add rounds to bf16; RoPE is computed in
// fp32 and rounded once (the model rounds each of its three bf16 ops: a last-bit difference).
// A decode step has few rows, so the point is fewer op dispatches, not bandwidth.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "bf16.h"
#include "ops.h"

namespace treepo {
namespace {

const uint16_t* cptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* mptr(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous ", dim, "-D bf16 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
}

void norm_rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t t0, int64_t t1, int64_t H, float eps) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* xr = x + t * H;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    uint16_t* yr = y + t * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      const float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * r));  // x.to(bf16) as the model
      yr[i] = float_to_bf16(bf16_to_float(w[i]) * normed);
    }
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_bf16(x, "rms_norm: x", 2);
  check_bf16(w, "rms_norm: w", 1);
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.size(0) == H, "rms_norm: w has ", w.size(0), " elements for rows of ", H);
  at::Tensor y = at::empty_like(x);
  const uint16_t *xp = cptr(x), *wp = cptr(w);
  uint16_t* yp = mptr(y);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) { norm_rows(xp, wp, yp, t0, t1, H, (float)eps); });
  return y;
}

at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& r, const at::Tensor& w, double eps) {
  check_bf16(x, "add_rms_norm: x", 2);
  check_bf16(r, "add_rms_norm: r", 2);
  check_bf16(w, "add_rms_norm: w", 1);
  TORCH_CHECK(x.sizes() == r.sizes(), "add_rms_norm: x ", x.sizes(), " and r ", r.sizes(), " differ");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.size(0) == H, "add_rms_norm: w has ", w.size(0), " elements for rows of ", H);
  at::Tensor y = at::empty_like(x);
  uint16_t* xp = mptr(x);
  const uint16_t *rp = cptr(r), *wp = cptr(w);
  uint16_t* yp = mptr(y);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0 * H; i < t1 * H; ++i) xp[i] = float_to_bf16(bf16_to_float(xp[i]) + bf16_to_float(rp[i]));
    norm_rows(xp, wp, yp, t0, t1, H, (float)eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos,
                                                       const at::Tensor& sin, int64_t Hq, int64_t Hkv) {
  check_bf16(qkv, "rope_qkv: qkv", 2);
  check_bf16(cos, "rope_qkv: cos", 2);
  check_bf16(sin, "rope_qkv: sin", 2);
  const int64_t T = qkv.size(0), D = cos.size(1);
  TORCH_CHECK(Hq > 0 && Hkv > 0 && D % 2 == 0 && qkv.size(1) == (Hq + 2 * Hkv) * D,
              "rope_qkv: qkv rows of ", qkv.size(1), " are not (Hq + 2 Hkv) * D = (", Hq, " + 2*", Hkv, ") * ", D);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == T, "rope_qkv: cos/sin must be [T, D], got ", cos.sizes(),
              " and ", sin.sizes());
  auto opts = qkv.options();
  at::Tensor q = at::empty({T, Hq, D}, opts), k = at::empty({T, Hkv, D}, opts), v = at::empty({T, Hkv, D}, opts);
  const uint16_t *src = cptr(qkv), *cp = cptr(cos), *sp = cptr(sin);
  uint16_t *qp = mptr(q), *kp = mptr(k), *vp = mptr(v);
  const int64_t W = qkv.size(1), half = D / 2;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* row = src + t * W;
      const uint16_t *c = cp + t * D, *s = sp + t * D;
      for (int64_t h = 0; h < Hq + Hkv; ++h) {
        const uint16_t* in = row + h * D;
        uint16_t* out = h < Hq ? qp + (t * Hq + h) * D : kp + (t * Hkv + h - Hq) * D;
        // rotate_half(x) = [-x2, x1]
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = bf16_to_float(in[i]), x2 = bf16_to_float(in[i + half]);
          out[i] = float_to_bf16(x1 * bf16_to_float(c[i]) - x2 * bf16_to_float(s[i]));
          out[i + half] = float_to_bf16(x2 * bf16_to_float(c[i + half]) + x1 * bf16_to_float(s[i + half]));
        }
      }
      std::memcpy(vp + t * Hkv * D, row + (Hq + Hkv) * D, Hkv * D * sizeof(uint16_t));
    }
  });
  return {q, k, v};
}

}  // namespace treepo
