"""Our own decoder for the Llama (incl. SmolLM2), Mistral, Qwen2 and Qwen3 families.

Why our own instead of transformers' modules: the engine decides the KV layout (paged, shared
between the branches of a tree) and the batching (flat ragged token batches, no padding), which
transformers' cache classes do not express. Parameter names equal transformers' so a checkpoint
directory loads (and exports) with no renaming; parity with transformers' logits is a test.

One forward serves two callers:
- training / scoring: `model(input_ids[B, T], attention_mask=None)` is a dense causal forward, and
  `model(input_ids[T], positions[T], attn=TreeAttention(...))` a forward over packed trees
  (treepo/train/batch.py, treepo/train/tree_attention.py);
- the engine: `model(input_ids[T], positions[T], attn=PagedAttention(...))` over a flat batch of
  new tokens of many sequences, whose attention reads and writes the paged KV cache.
Both return final hidden states; `model.logits(hidden)` applies the LM head (so the engine only
projects the rows it samples from).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2], default or llama3-scaled (Llama 3.1 recipe)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, attn):
        lead = x.shape[:-1]  # [T] (engine) or [B, T] (dense)
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attn(self.layer_idx, q, k, v)  # same shape as q
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DenseCausalAttention:
    """Attention for a dense [B, T] batch: causal, optionally with a key padding mask [B, T]."""

    def __init__(self, attention_mask: torch.Tensor | None):
        self.mask = None
        if attention_mask is not None:
            B, T = attention_mask.shape
            causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
            mask = causal[None] & attention_mask.bool()[:, None, :]  # [B, Tq, Tk]
            mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)  # no empty rows
            self.mask = mask[:, None]  # [B, 1, Tq, Tk]

    def __call__(self, layer_idx, q, k, v):
        # q [B, T, Hq, D], k/v [B, T, Hkv, D]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if self.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=gqa)
        return o.transpose(1, 2)


class CausalLM(nn.Module):
    """Decoder-only LM with transformers-compatible parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.hf_config: dict | None = None  # the config.json this model was loaded from, if any

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [..., D/2], fp32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, positions=None, attn=None, attention_mask=None, labels=None, label_start=None,
                label_positions=None):
        """Final hidden states, same leading shape as input_ids ([B, T] dense or [T] flat).

        Scoring modes (training) return (logp fp32, entropy fp32 detached) of labels under the LM head,
        computed inside forward so FSDP has the head's weights gathered, by `linear_logprobs` (no full
        [rows, V] logits):
        - dense: labels [B, R] and label_start s -> [B, R]; labels[:, j] is predicted at position
          s - 1 + j;
        - packed: flat input_ids [T], positions [T], attn (a TreeAttention), labels [U] and
          label_positions [U] -> [U]; labels[u] is predicted by the hidden state at label_positions[u]."""
        if attn is None:
            if positions is None:
                T = input_ids.shape[-1]
                positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
            attn = DenseCausalAttention(attention_mask)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        x = self.model.norm(x)
        if labels is None:
            return x
        from treepo.logprobs import linear_logprobs

        if label_positions is not None:
            if label_start is not None or input_ids.dim() != 1 or labels.shape != label_positions.shape:
                raise ValueError(f"packed scoring takes flat input_ids [T] (got {tuple(input_ids.shape)}), labels "
                                 f"[U] and label_positions [U] (got {tuple(labels.shape)}, "
                                 f"{tuple(label_positions.shape)}) and no label_start (got {label_start})")
            h = x[label_positions]  # [U, H]
        else:
            if label_start is None or labels.dim() != 2:
                raise ValueError(f"dense scoring takes labels [B, R] (got {tuple(labels.shape)}) and label_start "
                                 f"(got {label_start}); packed scoring takes label_positions")
            R = labels.shape[1]
            h = x[:, label_start - 1: label_start - 1 + R]  # [B, R, H]
        return linear_logprobs(h, self.lm_head.weight, labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
