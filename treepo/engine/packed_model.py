"""The engine's forward on a CPU with prepacked bf16 weights (csrc/linear.cpp).

A decode step multiplies a few rows by every weight of the model, so on a CPU its cost is reading
the weights. torch's bf16 linear re-lays-out each weight on every call and runs a 16-row step at a
third of memory speed; `linear_packed` reads weights packed once in the order its AVX512-BF16
inner loop wants them (2-3x faster at 1-32 rows, and still faster at 128). Packing also fuses
q/k/v into one GEMM and gate/up with silu(gate) * up into another: four GEMMs a layer instead of
seven.

`PackedModel(model)` holds the packed copies (as much memory again as the weights) and repacks
when any parameter changed (the trainer copies new weights into the engine's model in place,
which bumps each tensor's version counter). The math is the model's: RMSNorm and the rotary
embedding run as fused C++ ops (csrc/layer_ops.cpp, one op where PyTorch dispatches eight or
twelve), each GEMM accumulates in fp32 and rounds once to bf16 as torch's does.
Used by the engine on a CPU for bf16 models when the extension was built with AVX512-BF16.

Rows are independent: a packed GEMM reduces each row over K in one fixed order whatever the row
count or tile (csrc/linear.cpp), the fused ops work row by row, and cos / sin come from a table
built in fixed blocks of positions - so a token's hidden state does not depend on what else is in
the batch. That is what batch-invariant mode relies on (`invariant=True`, which also takes the
portable GEMM build and computes a biased MLP's silu row by row; docs/kernels.md).
"""
from __future__ import annotations

import torch

from treepo_kernels import cpu as kernels

from .model import CausalLM, rotate_half

ROPE_BLOCK = 1024  # positions per block of the cos / sin table


def packed_status(model: CausalLM, device, portable_ok: bool = False) -> tuple[bool, str]:
    """(usable, reason) for the packed path on this model and device; portable_ok accepts the
    extension's portable (slow) GEMM loop."""
    if torch.device(device).type != "cpu":
        return False, "runs on the CPU only"
    ok, why = kernels.status()
    if not ok:
        return False, why
    if kernels.gemm_impl() != "avx512bf16" and not portable_ok:
        return False, "the extension was built without AVX512-BF16 (this CPU lacks it, or TREEPO_NATIVE=0)"
    if next(model.parameters()).dtype != torch.bfloat16:
        return False, "the model is not bf16"
    cfg = model.config
    if cfg.hidden_size % 2 or cfg.intermediate_size % 2 or (cfg.num_heads * cfg.head_dim) % 2:
        return False, "a GEMM inner dimension is odd"
    return True, ""


class PackedModel:
    """Called as CausalLM is in the engine: `(input_ids [T], positions [T], attn=...) -> hidden [T, H]`
    and `logits(hidden) -> fp32 [T, V]`, equal to it up to GEMM summation order."""

    def __init__(self, model: CausalLM, invariant: bool = False):
        self.model, self.invariant = model, invariant
        self.repacks = 0
        D, dtype = model.config.head_dim, model.model.embed_tokens.weight.dtype
        self._cos = self._sin = torch.empty(0, D, dtype=dtype)  # [positions, D], grown by ROPE_BLOCK
        self._pack()

    def _state(self):
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    @torch.no_grad()
    def _pack(self):
        m, cfg = self.model, self.model.config
        self.layers = []
        for layer in m.model.layers:
            a, f = layer.self_attn, layer.mlp
            qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
            if f.gate_proj.bias is None:  # gate/up fused with silu(gate) * up
                gu, gu_b = kernels.pack_linear(torch.cat([f.gate_proj.weight, f.up_proj.weight]), gated=True), None
            else:  # a biased MLP: the bias goes inside silu, so gate and up stay two GEMMs
                gu = (kernels.pack_linear(f.gate_proj.weight), kernels.pack_linear(f.up_proj.weight))
                gu_b = (f.gate_proj.bias, f.up_proj.bias)
            self.layers.append({
                "qkv": kernels.pack_linear(qkv_w), "qkv_b": qkv_b,
                "o": kernels.pack_linear(a.o_proj.weight), "o_b": a.o_proj.bias, "gu": gu, "gu_b": gu_b,
                "down": kernels.pack_linear(f.down_proj.weight), "down_b": f.down_proj.bias,
            })
        self.lm_head = kernels.pack_linear(m.lm_head.weight)
        self.sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        self._versions = self._state()
        self.repacks += 1

    def refresh(self):
        """Repack if any weight changed since the last pack (cheap to call every step)."""
        if self._state() != self._versions:
            self._pack()

    def rope(self, positions: torch.Tensor):
        """cos, sin [T, D] of the positions, as CausalLM.rope, read from a table computed in fixed
        blocks of positions (a position's values never depend on the other positions of the step)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        while self._cos.shape[0] < need:
            n = self._cos.shape[0]
            c, s = self.model.rope(torch.arange(n, n + ROPE_BLOCK, device=positions.device), self._cos.dtype)
            self._cos, self._sin = torch.cat([self._cos, c]), torch.cat([self._sin, s])
        return self._cos[positions], self._sin[positions]

    def _silu(self, gate):
        if not self.invariant:
            return torch.nn.functional.silu(gate)
        return torch.stack([torch.nn.functional.silu(row) for row in gate])  # one fixed-size call a row

    def _linear(self, x, packed, n, bias=None):
        y = kernels.linear_packed(x, packed, n)
        return y if bias is None else y + bias

    @torch.inference_mode()
    def __call__(self, input_ids, positions, attn):
        m, cfg = self.model, self.model.config
        H, I, D, eps = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.rms_norm_eps
        nq, nkv = self.sizes
        ops = torch.ops.treepo
        layers = m.model.layers
        x = m.model.embed_tokens(input_ids)  # the residual stream, updated in place
        T = x.shape[0]
        cos, sin = self.rope(positions)
        h = ops.rms_norm(x, layers[0].input_layernorm.weight, eps)
        for i, (layer, p) in enumerate(zip(layers, self.layers)):
            a = layer.self_attn
            qkv = self._linear(h, p["qkv"], nq + 2 * nkv, p["qkv_b"])
            if a.qk_norm:  # the fused RMSNorm row by row over [T * heads, D]
                q = ops.rms_norm(qkv[:, :nq].reshape(-1, D), a.q_norm.weight, a.q_norm.eps).view(T, cfg.num_heads, D)
                k = ops.rms_norm(qkv[:, nq:nq + nkv].reshape(-1, D), a.k_norm.weight,
                                 a.k_norm.eps).view(T, cfg.num_kv_heads, D)
                v = qkv[:, nq + nkv:].contiguous().view(T, cfg.num_kv_heads, D)
                c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
                q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
            else:
                q, k, v = ops.rope_qkv(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads)
            o = self._linear(attn(i, q, k, v).reshape(T, nq), p["o"], H, p["o_b"])
            h = ops.add_rms_norm(x, o, layer.post_attention_layernorm.weight, eps)
            if p["gu_b"] is None:
                g = kernels.linear_packed(h, p["gu"], I, gated=True)
            else:
                gate = self._linear(h, p["gu"][0], I, p["gu_b"][0])
                g = self._silu(gate) * self._linear(h, p["gu"][1], I, p["gu_b"][1])
            nxt = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else m.model.norm.weight
            h = ops.add_rms_norm(x, self._linear(g, p["down"], H, p["down_b"]), nxt, eps)
        return h  # the final norm of the residual stream

    @torch.inference_mode()
    def logits(self, hidden):
        return kernels.linear_packed(hidden, self.lm_head, self.model.config.vocab_size, fp32_out=True)
