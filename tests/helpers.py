"""Tiny random transformers models of every supported family, for parity tests."""
import torch

FAMILIES = {
    # name: (config class name, extra kwargs)
    "llama_gqa4_untied": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope_gqa3": ("LlamaConfig", dict(
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True)),
    "qwen2_bias_gqa3": ("Qwen2Config", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3_norms_gqa4": ("Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                             tie_word_embeddings=True)),
    "mistral_gqa4": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                                           head_dim=8)),
}

CLASSES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
           "Qwen3Config": "Qwen3ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def tiny_hf_model(family: str, vocab=160, hidden=48, layers=2, seed=0, dtype=torch.float32):
    import transformers

    cfg_name, extra = FAMILIES[family]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kw.update(extra)
    if "head_dim" not in kw:
        kw["head_dim"] = hidden // kw["num_attention_heads"]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[cfg_name])(cfg).to(dtype).eval()
    with torch.no_grad():  # random biases / norm weights so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_close(actual, expected, atol, rtol=0.0, what="tensor"):
    """allclose that says how many elements differ and where the worst one is."""
    actual, expected = actual.float(), expected.float()
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max |diff| "
                             f"{diff.max().item():.3g} at {idx} (actual {actual[idx].item():.6g}, "
                             f"expected {expected[idx].item():.6g}); atol={atol} rtol={rtol}")
